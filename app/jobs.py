"""Job bookkeeping shared by the API, the worker task and the reaper (torch-free).

The job row is the truth; a broker message is only a doorbell carrying the job id, so any
message can be lost or duplicated without losing or double-running a job.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from celery import Celery
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from app import webhooks
from app.config import Settings
from app.errors import ErrorBody
from app.models import Job, JobEvent, utcnow
from app.schemas import JobPublic

log = logging.getLogger("prunery.jobs")

RUN_JOB_TASK = "workers.tasks.run_job"
# Every job that succeeds has these; a method (or the export) may add more files, stored
# under the names the engine wrote them with — the same as `prunery prune` writes (e.g.
# model.pt2, search_curves.png): see job.artifacts.
ARTIFACT_NAMES = ("model.onnx", "report.json", "report.md", "report.html", "analysis.json")
ARTIFACT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def add_event(
    session: Session,
    job: Job,
    kind: str,
    message: str | None = None,
    *,
    stage: str | None = None,
    progress: float | None = None,
) -> JobEvent:
    event = JobEvent(
        job_id=job.id,
        kind=kind,
        status=job.status,
        stage=stage if stage is not None else job.stage,
        progress=progress if progress is not None else job.progress,
        message=message,
    )
    session.add(event)
    return event


def set_state(session: Session, job: Job, status: str, message: str | None = None) -> None:
    job.status = status
    job.updated_at = utcnow()
    add_event(session, job, "state", message or status)
    webhooks.record_state_change(session, job)  # the outbox row commits with the state


def enqueue(
    celery: Celery, settings: Settings, factory: sessionmaker[Session], job_id: str
) -> bool:
    """Publish run_job(job_id) and stamp enqueued_at. Called only after the row is committed.

    A failure here is logged, not raised: the job stays queued with enqueued_at unset and
    the reaper publishes it again once the broker is back.
    """
    try:
        celery.send_task(
            RUN_JOB_TASK,
            args=[job_id],
            queue=settings.job_queue,
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
        )
    except Exception:
        log.exception("could not enqueue job %s; the reaper will retry", job_id)
        return False
    with factory() as session, session.begin():
        session.execute(update(Job).where(Job.id == job_id).values(enqueued_at=utcnow()))
    return True


def to_public(job: Job) -> JobPublic:
    error = None
    if job.error_code:
        error = ErrorBody(error=job.error_code, detail=job.error_detail or job.error_code)
    artifacts: dict[str, Any] = job.artifacts or {}
    return JobPublic(
        id=job.id,
        status=job.status,  # type: ignore[arg-type]
        stage=job.stage,
        progress=min(1.0, max(0.0, job.progress)),
        message=job.message,
        error=error,
        gates_passed=job.gates_passed,
        attempts=job.attempts,
        max_attempts=job.max_attempts,
        model_id=job.model_id,
        dataset_id=job.dataset_id,
        spec=job.spec,
        artifacts=sorted(artifacts),
        created_at=job.created_at,
        updated_at=job.updated_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        heartbeat_at=job.heartbeat_at,
    )
