"""Celery tasks around the jobs, kept thin like workers/tasks.py:

* `deliver_webhooks()` (beat, every PRUNERY_WEBHOOK_SWEEP_INTERVAL_S, control queue): sends
  the due rows of the webhook outbox (app/webhooks.py) — claim under a short lease, POST
  outside any transaction, record the attempt and the next retry time.
* `analyze_model(analysis_id)` (the job queue): load + analyse one uploaded model and store
  the `prunery.analysis.Analysis` on its row.
* `PARTIAL_ARTIFACTS`: what a failed run still publishes (`workers.tasks.store_outputs`; the analysis of a
  `budget_unreachable` job, so its excluded layers can be read).

Torch is imported only inside `analyze_model` (via the engine).
"""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import or_, select

from app.db import transaction
from app.extra_models import ModelAnalysis, WebhookDelivery
from app.models import DatasetFile, ModelFile, utcnow
from app.webhooks import attempt_delivery, finish_attempt, get_webhook_settings, tenant_secret
from workers.celery_app import ANALYZE, DELIVER_WEBHOOKS
from workers.celery_app import app as celery_app

log = logging.getLogger("prunery.worker")

PARTIAL_ARTIFACTS = ("analysis.json",)


def _runtime():  # type: ignore[no-untyped-def]
    from workers.tasks import runtime

    return runtime()


def sweep_webhooks(rt: Any) -> dict[str, int]:
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
        for row in rows:
            # A lease: if this process dies mid-POST the row is due again after it.
            row.status, row.next_attempt_at = "delivering", now + lease
            claimed.append((row.id, tenant_secret(s, row.tenant_id)))
    counts = {"delivered": 0, "retrying": 0, "failed": 0, "refused": 0}
    for delivery_id, secret in claimed:
        with rt.factory() as s:
            row = s.get(WebhookDelivery, delivery_id)
            if row is None:
                continue
            s.expunge(row)
        record = attempt_delivery(row, secret, ws)
        with transaction(rt.factory) as s:
            row = s.get(WebhookDelivery, delivery_id, with_for_update=True)
            if row is None:
                continue
            finish_attempt(row, record, ws, utcnow())
            counts["retrying" if row.status == "pending" else row.status] += 1
            if row.status != "delivered":
                log.warning("webhook %s for job %s: %s (%s)", row.id, row.job_id, row.status, record.get("error"))
    return counts


@celery_app.task(name=DELIVER_WEBHOOKS)
def deliver_webhooks() -> dict[str, int]:
    return sweep_webhooks(_runtime())


def run_analysis(rt: Any, analysis_id: str) -> str:
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
    from workers.engine.analysis import analyze
    from workers.errors import EngineError

    cache = Path(rt.settings.worker_cache_dir) / "inputs"
    cache.mkdir(parents=True, exist_ok=True)
    try:
        model_path = rt.storage.get_file(model_ref[1], cache / f"{model_ref[0]}.onnx")
        data_path = (
            rt.storage.get_file(data_ref[1], cache / f"{data_ref[0]}{data_ref[2]}") if data_ref else None
        )
        result = analyze(
            model_path, data_path, task=params.get("task", "classification"),
            round_to=int(params.get("round_to", 1)), max_model_bytes=rt.settings.max_model_bytes,
        )
    except EngineError as exc:
        finish(status="failed", error_code=exc.code, error_detail=exc.message)
        return f"failed: {exc.code}"
    except Exception as exc:
        log.exception("analysis %s crashed", analysis_id)
        finish(status="failed", error_code="internal_error",
               error_detail=f"the analysis crashed ({type(exc).__name__}: {exc}); this is a bug"[:2000])
        return "failed: internal error"
    finish(status="succeeded", result=result.model_dump(mode="json"))
    return "succeeded"


@celery_app.task(name=ANALYZE)
def analyze_model(analysis_id: str) -> str:
    return run_analysis(_runtime(), analysis_id)
