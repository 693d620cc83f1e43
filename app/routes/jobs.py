"""/v1/jobs: submit, list, inspect, cancel, follow (SSE), report and artifacts."""

from __future__ import annotations

import asyncio
import hashlib
import json
import weakref
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.abuse import MAX_EVENT_ID, parse_last_event_id, plausible_id
from app.deps import (
    CeleryDep,
    PrincipalDep,
    SessionDep,
    SettingsDep,
    StorageDep,
    after_commit,
)
from app.errors import Conflict, NotFound, TooManyRequests, Unprocessable, error_responses
from app.jobs import ARTIFACT_NAMES, add_event, enqueue, set_state, to_public
from app.metrics import JOBS_SUBMITTED
from app.models import ACTIVE, TERMINAL, DatasetFile, Job, JobEvent, ModelFile, utcnow
from app.quotas import check_queue
from app.schemas import JobCreate, JobEventPublic, JobPublic, JobsPublic, JobStatus
from app.storage import job_prefix
from workers.checks import ModelSummary, TensorInfo
from workers.methods.catalog import check_applicable, validate_params

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

ARTIFACT_TYPES = {
    ".onnx": "application/octet-stream",
    ".json": "application/json",
    ".md": "text/markdown; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".html": "text/html; charset=utf-8",
    ".csv": "text/csv; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
    ".pt2": "application/zip",
}


def _summary(d: dict) -> ModelSummary:  # type: ignore[type-arg]
    return ModelSummary(
        opset=d["opset"],
        inputs=[TensorInfo(**t) for t in d["inputs"]],
        outputs=[TensorInfo(**t) for t in d["outputs"]],
        op_histogram=d["op_histogram"],
        parameter_count=d["parameter_count"],
        file_bytes=d.get("file_bytes", 0),
        producer=d.get("producer", ""),
    )


def _owned_input(db: Session, cls: type, tenant_id: str, ident: str, what: str, how: str):  # type: ignore[no-untyped-def]
    row = db.get(cls, ident) if plausible_id(ident) else None
    if row is None or row.tenant_id != tenant_id:
        raise Unprocessable(
            f"{what} {ident!r} does not exist; {how}", code=f"unknown_{what.split('_')[0]}"
        )
    return row


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
    from app.webhooks import RefusedURL, get_webhook_settings, resolve_checked

    try:
        resolve_checked(spec.webhook.url, get_webhook_settings())
    except RefusedURL as exc:
        raise Unprocessable(str(exc), code="webhook_url_refused") from None


def _request_hash(spec: JobCreate) -> str:
    return hashlib.sha256(
        json.dumps(spec.model_dump(mode="json"), sort_keys=True).encode()
    ).hexdigest()


def _get_owned(db: Session, tenant_id: str, job_id: str) -> Job:
    job = db.get(Job, job_id) if plausible_id(job_id) else None
    if job is None or job.tenant_id != tenant_id:
        raise NotFound(f"no job {job_id!r}; list yours with GET /v1/jobs")
    return job


@router.post(
    "",
    status_code=202,
    response_model=JobPublic,
    summary="Submit a pruning job",
    description="Validates the spec against the method's params schema and applicability, "
    "stores the job and enqueues it after the transaction commits. Send an `Idempotency-Key` "
    "header to make retries safe: the same key with the same body returns the same job; with "
    "a different body it is a 409.",
    responses=error_responses(400, 401, 409, 422, 429),
)
def create_job(
    spec: JobCreate,
    response: Response,
    db: SessionDep,
    principal: PrincipalDep,
    settings: SettingsDep,
    celery: CeleryDep,
    request: Request,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> JobPublic:
    tenant = principal.tenant_id
    request_hash = _request_hash(spec)
    if idempotency_key:
        existing = db.scalar(
            select(Job).where(Job.tenant_id == tenant, Job.idempotency_key == idempotency_key)
        )
        if existing is not None:
            return _replay(existing, request_hash, response)

    model = _owned_input(
        db, ModelFile, tenant, spec.model_id, "model_id", "upload it with POST /v1/models"
    )
    dataset = _owned_input(
        db, DatasetFile, tenant, spec.dataset_id, "dataset_id", "upload it with POST /v1/datasets"
    )
    if spec.eval_dataset_id:
        _owned_input(
            db,
            DatasetFile,
            tenant,
            spec.eval_dataset_id,
            "eval_dataset_id",
            "upload it with POST /v1/datasets",
        )
    params = validate_params(spec.method.name, spec.method.params)  # BadSpec → 422
    check_applicable(spec.method.name, _summary(model.summary), spec.task)  # NotApplicable → 422
    ds_task = dataset.summary.get("task", "classification")
    if ds_task != spec.task:
        raise Unprocessable(
            f"dataset {dataset.id} was uploaded for task {ds_task!r} but the job asks for "
            f"{spec.task!r}; upload it again with task={spec.task}",
            code="task_mismatch",
        )
    _check_shapes(model, dataset, spec)
    check_webhook_url(spec)

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

    body = spec.model_dump(mode="json")
    body["method"]["params"] = params.model_dump(mode="json")  # defaults filled in
    job = Job(
        tenant_id=tenant,
        model_id=model.id,
        dataset_id=dataset.id,
        eval_dataset_id=spec.eval_dataset_id,
        spec=body,
        status="queued",
        progress=0.0,
        attempts=0,
        max_attempts=settings.max_attempts,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
    )
    db.add(job)
    try:
        db.flush()
    except IntegrityError:  # a concurrent retry with the same Idempotency-Key won the race
        db.rollback()
        existing = db.scalar(
            select(Job).where(Job.tenant_id == tenant, Job.idempotency_key == idempotency_key)
        )
        if existing is None:
            raise
        return _replay(existing, request_hash, response)
    add_event(db, job, "state", "queued")
    JOBS_SUBMITTED.inc()
    state = request.app.state
    after_commit(db, lambda: enqueue(celery, settings, state.sessionmaker, job.id))
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return to_public(job)


def _replay(existing: Job, request_hash: str, response: Response) -> JobPublic:
    if existing.request_hash != request_hash:
        raise Conflict(
            "this Idempotency-Key was already used for a different job spec; use a new key",
            code="idempotency_key_reused",
        )
    response.headers["Location"] = f"/v1/jobs/{existing.id}"
    response.headers["Idempotent-Replayed"] = "true"
    return to_public(existing)


@router.get("", response_model=JobsPublic, responses=error_responses(401, 422, 429))
def list_jobs(
    db: SessionDep,
    principal: PrincipalDep,
    status: Annotated[list[JobStatus] | None, Query(description="Repeat to match several.")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
) -> JobsPublic:
    where = [Job.tenant_id == principal.tenant_id]
    if status:
        where.append(Job.status.in_(status))
    count = db.scalar(select(func.count()).select_from(Job).where(*where)) or 0
    rows = db.scalars(
        select(Job)
        .where(*where)
        .order_by(Job.created_at.desc(), Job.id.desc())
        .limit(limit)
        .offset(offset)
    )
    return JobsPublic(data=[to_public(j) for j in rows], count=count, limit=limit, offset=offset)


@router.get("/{job_id}", response_model=JobPublic, responses=error_responses(401, 404, 429))
def get_job(job_id: str, db: SessionDep, principal: PrincipalDep) -> JobPublic:
    return to_public(_get_owned(db, principal.tenant_id, job_id))


@router.post(
    "/{job_id}/cancel",
    status_code=202,
    response_model=JobPublic,
    description="A queued job is cancelled at once; a running one goes to `cancelling` and "
    "stops at the engine's next step. Cancelling a cancelled/cancelling job is a no-op; a "
    "finished job is a 409.",
    responses=error_responses(401, 404, 409, 429),
)
def cancel_job(job_id: str, db: SessionDep, principal: PrincipalDep) -> JobPublic:
    job = _get_owned(db, principal.tenant_id, job_id)
    # Lock the row: the worker may be claiming it right now.
    db.refresh(job, with_for_update=True)
    if job.status == "queued":
        set_state(db, job, "cancelled", "cancelled before it started")
        job.error_code, job.error_detail = "cancelled", "cancelled by the user"
        job.finished_at = utcnow()
    elif job.status == "running":
        set_state(db, job, "cancelling", "cancellation requested")
    elif job.status in ("succeeded", "failed"):
        raise Conflict(
            f"job {job.id} already {job.status}; there is nothing to cancel", code="job_finished"
        )
    return to_public(job)


@router.delete(
    "/{job_id}",
    status_code=204,
    summary="Delete a finished job with its events and artifacts",
    description="A queued or running job is a 409: cancel it first. Artifacts are removed "
    "from storage before the row, so nothing is left behind.",
    responses=error_responses(401, 404, 409, 429),
)
def delete_job(
    job_id: str, db: SessionDep, principal: PrincipalDep, storage: StorageDep
) -> Response:
    job = _get_owned(db, principal.tenant_id, job_id)
    db.refresh(job, with_for_update=True)
    if job.status in ACTIVE:
        raise Conflict(
            f"job {job.id} is {job.status}; cancel it (POST /v1/jobs/{job.id}/cancel) and "
            "delete it once it has stopped",
            code="job_active",
        )
    storage.delete_prefix(job_prefix(job.tenant_id, job.id))
    db.delete(job)
    return Response(status_code=204)


def _events_after(
    factory, job_id: str, after: int, limit: int = 500
) -> tuple[list[JobEventPublic], str]:  # type: ignore[no-untyped-def]
    with factory() as session:
        rows = session.scalars(
            select(JobEvent)
            .where(JobEvent.job_id == job_id, JobEvent.id > after, JobEvent.kind != "debug")
            .order_by(JobEvent.id)
            .limit(limit)
        ).all()
        status = session.scalar(select(Job.status).where(Job.id == job_id)) or "failed"
        return [JobEventPublic.model_validate(r) for r in rows], status


@router.get(
    "/{job_id}/events",
    summary="Follow a job: Server-Sent Events of state, progress and log lines",
    description="`text/event-stream` (default): replays events after `Last-Event-ID` (or "
    "`after`), then streams new ones until the job ends. With `Accept: application/json`, "
    "returns the events after `after` as a JSON list instead.",
    responses={200: {"content": {"text/event-stream": {}, "application/json": {}}}}
    | error_responses(400, 401, 404, 429),
)
async def job_events(
    job_id: str,
    request: Request,
    principal: PrincipalDep,
    settings: SettingsDep,
    after: Annotated[int, Query(ge=0, le=MAX_EVENT_ID)] = 0,
    last_event_id: Annotated[str | None, Header(max_length=64)] = None,
) -> Response:
    factory = request.app.state.sessionmaker
    resume = parse_last_event_id(last_event_id)  # 400 unless a plain event id

    def _check() -> None:
        with factory() as session:
            _get_owned(session, principal.tenant_id, job_id)

    await run_in_threadpool(_check)
    if resume is not None:
        after = max(after, resume)
    if "application/json" in request.headers.get(
        "accept", ""
    ) and "text/event-stream" not in request.headers.get("accept", ""):
        events, _ = await run_in_threadpool(_events_after, factory, job_id, after, 10_000)
        return JSONResponse([e.model_dump(mode="json") for e in events])

    # One of the tenant's stream slots (429 past the cap), released when the stream ends. Each
    # poll is its own short transaction: no connection is held between polls.
    lease = request.app.state.caps.acquire("stream", principal.tenant_id)

    async def stream():  # type: ignore[no-untyped-def]
        try:
            async for chunk in _follow():
                yield chunk
        finally:
            lease.release()

    async def _follow():  # type: ignore[no-untyped-def]
        cursor = after
        last_sent = asyncio.get_running_loop().time()
        ends_at = last_sent + settings.max_stream_duration_s
        yield "retry: 2000\n\n"
        while asyncio.get_running_loop().time() < ends_at:
            events, status = await run_in_threadpool(_events_after, factory, job_id, cursor)
            for ev in events:
                cursor = ev.id
                yield f"id: {ev.id}\nevent: {ev.kind}\ndata: {ev.model_dump_json()}\n\n"
                last_sent = asyncio.get_running_loop().time()
            if not events and status in TERMINAL:
                yield f"event: end\ndata: {json.dumps({'status': status})}\n\n"
                return
            if await request.is_disconnected():
                return
            if asyncio.get_running_loop().time() - last_sent > settings.events_keepalive_s:
                yield ": keep-alive\n\n"
                last_sent = asyncio.get_running_loop().time()
            if not events:
                await asyncio.sleep(settings.events_poll_interval_s)

    body = stream()
    weakref.finalize(body, lease.release)  # also when the stream never started
    return StreamingResponse(
        body,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.get(
    "/{job_id}/report",
    summary="The job's report (prunery.report.Report as JSON)",
    responses={200: {"content": {"application/json": {}}}} | error_responses(401, 404, 409, 429),
)
def job_report(job_id: str, db: SessionDep, principal: PrincipalDep) -> JSONResponse:
    job = _get_owned(db, principal.tenant_id, job_id)
    if job.report is None:
        raise Conflict(
            f"job {job.id} is {job.status}; the report exists once it has succeeded",
            code="report_not_ready",
        )
    return JSONResponse(job.report)


@router.get(
    "/{job_id}/artifacts/{name}",
    summary="Download an artifact: model.onnx, report.json, report.md, or any file the job lists",
    responses={200: {"content": {"application/octet-stream": {}}}}
    | error_responses(401, 404, 409, 429),
)
def job_artifact(
    job_id: str, name: str, db: SessionDep, principal: PrincipalDep, storage: StorageDep
) -> Response:
    job = _get_owned(db, principal.tenant_id, job_id)
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
        raise NotFound(f"job {job.id} has no artifact {name!r}; it has {', '.join(sorted(artifacts))}")
    key = artifacts[name]["key"]
    size = storage.size(key)
    return StreamingResponse(
        storage.open_chunks(key),
        media_type=ARTIFACT_TYPES.get(Path(name).suffix, "application/octet-stream"),
        headers={
            "Content-Length": str(size),
            "Content-Disposition": f'attachment; filename="{job.id}-{name}"',
            "X-Content-SHA256": artifacts[name].get("sha256", ""),
        },
    )
