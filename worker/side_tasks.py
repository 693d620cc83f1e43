"""Celery tasks around the jobs (shared_tasks, like worker/tasks.py):

* `deliver_webhooks()` (beat, every PRUNERY_WEBHOOK_SWEEP_INTERVAL_S, control queue): sends
  the due rows of the webhook outbox (core/webhooks.py) — claim under a short lease, POST
  outside any transaction, record the attempt and the next retry time.
* `analyze_model(analysis_id)` (the job queue): load + analyse one uploaded model and store
  the `prunery.analysis.Analysis` on its row; its time estimate is for the row's
  `params.spec` when the request carried one (the task message stays just the id).
* `PARTIAL_ARTIFACTS`: what a failed run still publishes (`worker.tasks.store_outputs`; the analysis of a
  `budget_unreachable` job, so its excluded layers can be read).

Torch is imported only inside `analyze_model` (via the engine).
"""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

from celery import shared_task
from sqlalchemy import or_, select

from core.broker import ANALYZE, DELIVER_WEBHOOKS
from core.db import transaction
from core.orm import DatasetFile, ModelAnalysis, ModelFile, WebhookDelivery, utcnow
from core.webhooks import attempt_delivery, finish_attempt, get_webhook_settings, tenant_secret
from prunery.spec import JobSpec
from worker.runner import outcome_of
from worker.runtime import Runtime, runtime

log = logging.getLogger("prunery.worker")


def sweep_webhooks(rt: Runtime) -> dict[str, int]:
    ws = get_webhook_settings()
    now = utcnow()
    lease = timedelta(seconds=ws.timeout_s * 3 + 30)
    claimed: list[tuple[str, str]] = []
    with transaction(rt.factory) as s:
        rows = s.scalars(
            select(WebhookDelivery)
            .where(
                or_(WebhookDelivery.status == "pending", WebhookDelivery.status == "delivering"),
                WebhookDelivery.next_attempt_at <= now,
            )
            .order_by(WebhookDelivery.next_attempt_at)
            .limit(ws.batch)
            .with_for_update(skip_locked=True)
        ).all()
        for due in rows:
            # A lease: if this process dies mid-POST the row is due again after it.
            due.status, due.next_attempt_at = "delivering", now + lease
            claimed.append((due.id, tenant_secret(s, due.tenant_id)))
    counts = {"delivered": 0, "retrying": 0, "failed": 0, "refused": 0}
    for delivery_id, secret in claimed:
        with rt.factory() as s:
            sent = s.get(WebhookDelivery, delivery_id)
            if sent is None:
                continue
            s.expunge(sent)
        record = attempt_delivery(sent, secret, ws)
        with transaction(rt.factory) as s:
            row = s.get(WebhookDelivery, delivery_id, with_for_update=True)
            if row is None:
                continue
            finish_attempt(row, record, ws, utcnow())
            counts["retrying" if row.status == "pending" else row.status] += 1
            if row.status != "delivered":
                log.warning(
                    "webhook %s for job %s: %s (%s)",
                    row.id,
                    row.job_id,
                    row.status,
                    record.get("error"),
                )
    return counts


@shared_task(name=DELIVER_WEBHOOKS)
def deliver_webhooks() -> dict[str, int]:
    return sweep_webhooks(runtime())


def run_analysis(rt: Runtime, analysis_id: str) -> str:
    with transaction(rt.factory) as s:
        row = s.get(ModelAnalysis, analysis_id, with_for_update=True)
        if row is None or row.status != "queued":
            return f"analysis {analysis_id}: nothing to do"
        row.status = "running"
        model = s.get(ModelFile, row.model_id)
        dataset = s.get(DatasetFile, row.dataset_id) if row.dataset_id else None
        params = dict(row.params)
        model_ref = (model.id, model.storage_key) if model else None
        data_ref = (dataset.id, dataset.storage_key, dataset.format) if dataset else None

    def finish(**values: Any) -> None:
        with transaction(rt.factory) as s:
            r = s.get(ModelAnalysis, analysis_id)
            if r is not None:
                for k, v in values.items():
                    setattr(r, k, v)
                r.finished_at = utcnow()

    if model_ref is None:
        finish(status="failed", error_code="input_deleted", error_detail="the model was deleted")
        return "failed"
    from engine.analysis import analyze
    from methods import registry

    cache = Path(rt.settings.worker_cache_dir) / "inputs"
    cache.mkdir(parents=True, exist_ok=True)
    try:
        model_path = rt.storage.get_file(model_ref[1], cache / f"{model_ref[0]}.onnx")
        data_path = (
            rt.storage.get_file(data_ref[1], cache / f"{data_ref[0]}{data_ref[2]}")
            if data_ref
            else None
        )
        task = params.get("task", "classification")
        spec = (
            JobSpec.model_validate({**params["spec"], "task": task}) if params.get("spec") else None
        )
        result = analyze(
            model_path,
            data_path,
            task=task,
            round_to=int(params.get("round_to", 1)),
            max_model_bytes=rt.settings.max_model_bytes,
            catalog=registry,
            spec=spec,
        )
    except Exception as exc:
        outcome = outcome_of(exc, rt.settings)
        detail = outcome.detail
        if outcome.keep_traceback:
            log.exception("analysis %s crashed", analysis_id)
            detail = f"the analysis crashed ({type(exc).__name__}: {exc}); this is a bug"[:2000]
        finish(status="failed", error_code=outcome.code, error_detail=detail)
        return outcome.result
    finish(status="succeeded", result=result.model_dump(mode="json"))
    return "succeeded"


@shared_task(name=ANALYZE)
def analyze_model(analysis_id: str) -> str:
    return run_analysis(runtime(), analysis_id)
