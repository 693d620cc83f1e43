"""Jobs: submit (validate inputs, quotas, idempotency, enqueue after commit), list, cancel,
delete, report and artifacts. The state transitions themselves belong to core.jobs.lifecycle."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from celery import Celery
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from app.deps import after_commit
from app.errors import Conflict, NotFound, TooManyRequests, Unprocessable
from app.features.common import Page, fetch_page, get_owned, owned_input
from app.features.jobs.schemas import JobCreate, JobsPublic
from app.features.methods.service import check_applicable, validate_params
from app.metrics import JOBS_SUBMITTED
from app.quotas import check_queue
from core.jobs.lifecycle import AlreadyFinished, enqueue, new_job, request_cancel, submitted
from core.jobs.public import to_public
from core.orm import DatasetFile, Job, ModelFile
from core.settings import Settings
from core.storage import Storage, job_prefix
from core.validation.interface import check_dataset_fits_model, check_model_summary
from core.validation.onnx_checks import ModelSummary, TensorInfo
from prunery.analysis import Analysis
from prunery.html_report import render_html
from prunery.report import Report
from prunery.types import ACTIVE, ARTIFACT_NAMES, JobStatus

UPLOAD_DATASET = "upload it with POST /v1/datasets"


def get_job(db: Session, tenant_id: str, job_id: str) -> Job:
    return get_owned(db, Job, tenant_id, job_id, "job", "list yours with GET /v1/jobs")


def _summary(d: dict[str, Any]) -> ModelSummary:
    return ModelSummary(
        opset=d["opset"],
        inputs=[TensorInfo(**t) for t in d["inputs"]],
        outputs=[TensorInfo(**t) for t in d["outputs"]],
        op_histogram=d["op_histogram"],
        parameter_count=d["parameter_count"],
        file_bytes=d.get("file_bytes", 0),
        producer=d.get("producer", ""),
    )


def _check_shapes(model: ModelFile, dataset: DatasetFile, spec: JobCreate) -> None:
    """A fixed model input shape must match the dataset's samples (classification)."""
    if spec.task != "classification" or spec.data.image_size is not None:
        return
    inputs = model.summary.get("inputs") or []
    if len(inputs) != 1:
        return
    dims = inputs[0]["shape"][1:]
    sample = dataset.summary.get("sample_shape") or []
    if len(dims) != len(sample):
        raise Unprocessable(
            f"the model's input {inputs[0]['name']!r} has shape {inputs[0]['shape']} but the "
            f"dataset's samples have shape {sample}; they must agree (batch dimension first)",
            code="shape_mismatch",
        )
    for d, s in zip(dims, sample, strict=True):
        if isinstance(d, int) and d != s:
            raise Unprocessable(
                f"the model's input {inputs[0]['name']!r} has shape {inputs[0]['shape']} but the "
                f"dataset's samples have shape {sample}",
                code="shape_mismatch",
            )


def check_webhook_url(spec: JobCreate) -> None:
    """Refuse a webhook that could reach internal services (SSRF), at submit time."""
    if spec.webhook is None:
        return
    from core.webhooks import RefusedURL, get_webhook_settings, resolve_checked

    try:
        resolve_checked(spec.webhook.url, get_webhook_settings())
    except RefusedURL as exc:
        raise Unprocessable(str(exc), code="webhook_url_refused") from None


def _request_hash(spec: JobCreate) -> str:
    return hashlib.sha256(
        json.dumps(spec.model_dump(mode="json"), sort_keys=True).encode()
    ).hexdigest()


def _validate(db: Session, tenant: str, spec: JobCreate) -> tuple[ModelFile, DatasetFile, Any]:
    """The spec's inputs exist and fit together; returns (model, dataset, validated params)."""
    model = owned_input(
        db, ModelFile, tenant, spec.model_id, "model_id", "upload it with POST /v1/models"
    )
    dataset = owned_input(db, DatasetFile, tenant, spec.dataset_id, "dataset_id", UPLOAD_DATASET)
    if spec.eval_dataset_id:
        owned_input(
            db, DatasetFile, tenant, spec.eval_dataset_id, "eval_dataset_id", UPLOAD_DATASET
        )
    params = validate_params(spec.method.name, spec.method.params)  # BadSpec → 422
    # What the uploads recorded already dooms some jobs: refuse them now, with the message and
    # code `prunery prune` gives (BadModel/BadDataset → 422), in the order the engine checks.
    check_model_summary(model.summary)
    check_applicable(spec.method.name, _summary(model.summary), spec.task)  # NotApplicable → 422
    ds_task = dataset.summary.get("task", "classification")
    if ds_task != spec.task:
        raise Unprocessable(
            f"dataset {dataset.id} was uploaded for task {ds_task!r} but the job asks for "
            f"{spec.task!r}; upload it again with task={spec.task}",
            code="task_mismatch",
        )
    _check_shapes(model, dataset, spec)
    check_dataset_fits_model(
        model.summary, dataset.summary, spec.task, separate_evaluation=bool(spec.eval_dataset_id)
    )
    check_webhook_url(spec)
    return model, dataset, params


def _check_quotas(db: Session, settings: Settings, tenant: str) -> None:
    active = (
        db.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.tenant_id == tenant, Job.status.in_(ACTIVE))
        )
        or 0
    )
    check_queue(db, settings, tenant)  # queued + recently churned jobs
    if active >= settings.max_active_jobs_per_tenant:
        raise TooManyRequests(
            f"you have {active} queued or running jobs (limit {settings.max_active_jobs_per_tenant}); "
            "wait for some to finish",
            code="too_many_active_jobs",
            headers={"Retry-After": "30"},
        )


@dataclass(frozen=True)
class Submitted:
    job: Job
    replayed: bool  # an Idempotency-Key retry answered with the job it created before


def _by_key(db: Session, tenant: str, key: str | None, request_hash: str) -> Submitted | None:
    existing = db.scalar(select(Job).where(Job.tenant_id == tenant, Job.idempotency_key == key))
    if existing is None:
        return None
    if existing.request_hash != request_hash:
        raise Conflict(
            "this Idempotency-Key was already used for a different job spec; use a new key",
            code="idempotency_key_reused",
        )
    return Submitted(existing, replayed=True)


def submit(
    db: Session,
    settings: Settings,
    celery: Celery,
    factory: sessionmaker[Session],
    tenant: str,
    spec: JobCreate,
    idempotency_key: str | None,
) -> Submitted:
    """Store a queued job (or replay the one this Idempotency-Key made) and enqueue it once
    the request's transaction has committed."""
    request_hash = _request_hash(spec)
    if idempotency_key and (done := _by_key(db, tenant, idempotency_key, request_hash)):
        return done
    model, dataset, params = _validate(db, tenant, spec)
    _check_quotas(db, settings, tenant)
    body = spec.model_dump(mode="json")
    body["method"]["params"] = params.model_dump(mode="json")  # defaults filled in
    job = new_job(
        tenant_id=tenant,
        model_id=model.id,
        dataset_id=dataset.id,
        eval_dataset_id=spec.eval_dataset_id,
        spec=body,
        max_attempts=settings.max_attempts,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
    )
    db.add(job)
    try:
        db.flush()
    except IntegrityError:  # a concurrent retry with the same Idempotency-Key won the race
        db.rollback()
        done = _by_key(db, tenant, idempotency_key, request_hash)
        if done is None:
            raise
        return done
    submitted(db, job)
    JOBS_SUBMITTED.inc()
    job_id = job.id

    def publish() -> None:
        enqueue(celery, settings, factory, job_id)

    after_commit(db, publish)
    return Submitted(job, replayed=False)


def list_jobs(
    db: Session, tenant_id: str, status: list[JobStatus] | None, window: Page
) -> JobsPublic:
    where = [Job.tenant_id == tenant_id]
    if status:
        where.append(Job.status.in_(status))
    order = [Job.created_at.desc(), Job.id.desc()]
    rows, count = fetch_page(db, Job, where, order, window)
    ids = {j.model_id for j in rows if j.model_id}
    names = (
        dict(
            db.execute(select(ModelFile.id, ModelFile.filename).where(ModelFile.id.in_(ids))).all()
        )
        if ids
        else {}
    )
    return JobsPublic(
        data=[to_public(j, names.get(j.model_id or "")) for j in rows],
        count=count,
        limit=window.limit,
        offset=window.offset,
    )


def cancel(db: Session, tenant_id: str, job_id: str) -> Job:
    """Request the tenant's job to stop (see request_cancel); 409 job_finished when it has."""
    job = get_job(db, tenant_id, job_id)
    try:
        request_cancel(db, job)
    except AlreadyFinished as exc:
        raise Conflict(str(exc), code="job_finished") from None
    return job


def delete_job(db: Session, storage: Storage, tenant_id: str, job_id: str) -> None:
    """Artifacts go from storage before the row, so nothing is left behind; 409 while active."""
    job = get_job(db, tenant_id, job_id)
    db.refresh(job, with_for_update=True)
    if job.status in ACTIVE:
        raise Conflict(
            f"job {job.id} is {job.status}; cancel it (POST /v1/jobs/{job.id}/cancel) and "
            "delete it once it has stopped",
            code="job_active",
        )
    storage.delete_prefix(job_prefix(job.tenant_id, job.id))
    db.delete(job)


def report(db: Session, tenant_id: str, job_id: str) -> tuple[Job, dict[str, Any]]:
    job = get_job(db, tenant_id, job_id)
    if job.report is None:
        raise Conflict(
            f"job {job.id} is {job.status}; the report exists once it has succeeded",
            code="report_not_ready",
        )
    return job, job.report


def artifact(db: Session, tenant_id: str, job_id: str, name: str) -> tuple[Job, dict[str, Any]]:
    """The job and the artifact's entry ({"key", "sha256", ...}); 404 unknown, 409 not yet."""
    job = get_job(db, tenant_id, job_id)
    artifacts = job.artifacts or {}
    if not artifacts:
        if name not in ARTIFACT_NAMES:
            raise NotFound(
                f"job {job.id} has no artifact {name!r}; once it succeeds it has "
                f"{', '.join(ARTIFACT_NAMES)} and any file its method writes"
            )
        raise Conflict(
            f"job {job.id} is {job.status}; artifacts exist once it has succeeded",
            code="artifact_not_ready",
        )
    if name not in artifacts:
        raise NotFound(
            f"job {job.id} has no artifact {name!r}; it has {', '.join(sorted(artifacts))}"
        )
    entry: dict[str, Any] = artifacts[name]
    return job, entry


def report_page(db: Session, storage: Storage, tenant_id: str, job_id: str) -> str:
    """The report as one self-contained HTML page (with the analysis panel when stored)."""
    job, body = report(db, tenant_id, job_id)
    analysis = None
    entry = (job.artifacts or {}).get("analysis.json")
    if entry:
        try:
            analysis = Analysis.model_validate(
                json.loads(b"".join(storage.open_chunks(entry["key"])))
            )
        except Exception:  # the page is still useful without the analysis panel
            analysis = None
    parsed = Report.model_validate(body)
    return render_html(
        parsed, analysis, title=f"Prunery report — {parsed.method.get('name')} ({job.id})"
    )
