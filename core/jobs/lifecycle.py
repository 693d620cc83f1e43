"""Every state transition of a job, one function each (torch-free; the API, the worker task
and the reaper all call these).

    submit ─► queued ─► claim ─► running ─► succeed ─► succeeded
                 ▲                  │  └──► fail ─────► failed
                 └── reap (stale) ──┤  request_cancel
                                    ▼
               request_cancel   cancelling ─► finish_cancelled ─► cancelled

The job row is the truth; a broker message is only a doorbell carrying the job id, so any
message can be lost or duplicated without losing or double-running a job. Each status
string is written by exactly one private helper below (`_queued`, `_running`, ...), which
also records the `state` event and the webhook outbox row in the same transaction.

A run owns its job through `run_token`: `claim` issues it, and `heartbeat` / `owned`
answer "not yours any more" (None) once the reaper has given the job to another run.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from core import webhooks
from core.broker import RUN_JOB
from core.orm import DatasetFile, Job, JobEvent, ModelFile, utcnow
from core.settings import Settings

log = logging.getLogger("prunery.jobs")

# A stored artifact's name: the engine's own file names (prunery.types.ARTIFACT_NAMES and
# whatever a method adds), never a path.
ARTIFACT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
CANCELLED_BY_USER = "cancelled by the user"


class Publisher(Protocol):
    """What `enqueue` needs of a Celery app (core.broker.make_producer builds one)."""

    def send_task(self, name: str, *args: Any, **kwargs: Any) -> Any: ...


class AlreadyFinished(Exception):
    """A cancel request for a job that already succeeded or failed."""


# ---------------------------------------------------------------- events and states


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


def _set_state(session: Session, job: Job, status: str, message: str) -> None:
    job.status = status
    job.updated_at = utcnow()
    add_event(session, job, "state", message)
    webhooks.record_state_change(session, job)  # the outbox row commits with the state


def _queued(session: Session, job: Job, message: str) -> None:
    job.run_token, job.worker = None, None
    job.stage, job.progress, job.message = None, 0.0, None
    _set_state(session, job, "queued", message)


def _running(session: Session, job: Job, worker: str, now: datetime) -> str:
    token = uuid.uuid4().hex
    job.run_token = token
    job.attempts += 1
    job.worker = worker
    job.started_at = job.started_at or now
    job.heartbeat_at = now
    job.stage, job.progress, job.message = "load", 0.0, None
    job.error_code = job.error_detail = None
    note = f"running on {worker} (attempt {job.attempts} of {job.max_attempts})"
    _set_state(session, job, "running", note)
    return token


def _cancelling(session: Session, job: Job) -> None:
    _set_state(session, job, "cancelling", "cancellation requested")


def _ended(job: Job, code: str | None, detail: str | None) -> None:
    job.error_code, job.error_detail = code, detail
    job.finished_at = utcnow()
    job.run_token = None


def _cancelled(session: Session, job: Job, message: str) -> None:
    _ended(job, "cancelled", CANCELLED_BY_USER)
    _set_state(session, job, "cancelled", message)


def _failed(session: Session, job: Job, code: str, detail: str, message: str) -> None:
    _ended(job, code, detail)
    _set_state(session, job, "failed", message)


def _succeeded(session: Session, job: Job, message: str) -> None:
    _ended(job, None, None)
    _set_state(session, job, "succeeded", message)


# ---------------------------------------------------------------- submit and enqueue


def new_job(**fields: Any) -> Job:
    """A job row about to be submitted (queued, no attempt yet); add and flush it, then
    call `submitted`."""
    return Job(status="queued", progress=0.0, attempts=0, **fields)


def submitted(session: Session, job: Job) -> None:
    """Record the submission (the `queued` event; no webhook: nobody waits for it)."""
    add_event(session, job, "state", job.status)


def enqueue(
    producer: Publisher, settings: Settings, factory: sessionmaker[Session], job_id: str
) -> bool:
    """Publish run_job(job_id) and stamp enqueued_at. Called only after the row is committed.

    A failure here is logged, not raised: the job stays queued with enqueued_at unset and
    the reaper publishes it again once the broker is back.
    """
    try:
        producer.send_task(
            RUN_JOB,
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


# ---------------------------------------------------------------- cancel (the API)


def request_cancel(session: Session, job: Job) -> None:
    """A queued job is cancelled at once; a running one goes to `cancelling` (the run stops
    at its next progress call); cancelled/cancelling: nothing to do; succeeded/failed:
    `AlreadyFinished`. The row is locked first: a worker may be claiming it right now."""
    session.refresh(job, with_for_update=True)
    if job.status == "queued":
        _cancelled(session, job, "cancelled before it started")
    elif job.status == "running":
        _cancelling(session, job)
    elif job.status in ("succeeded", "failed"):
        raise AlreadyFinished(f"job {job.id} already {job.status}; there is nothing to cancel")


# ---------------------------------------------------------------- claim (the worker)


@dataclass(frozen=True)
class Claim:
    """What a run needs from the rows, read under the claim's lock."""

    token: str
    tenant_id: str
    spec: dict[str, Any]
    model: tuple[str, str, str]  # (id, storage key, suffix)
    dataset: tuple[str, str, str]
    eval_dataset: tuple[str, str, str] | None


def claim(
    session: Session,
    job_id: str,
    *,
    worker: str,
    heartbeat_timeout_s: float,
    alive: Callable[[str | None], bool | None],
) -> Claim | str:
    """queued (or running on a lost worker) → running for this run: a `Claim`, or the
    reason to do nothing. `alive(job.worker)` says whether the recorded process still
    lives (None: cannot tell, e.g. another host; then the heartbeat decides)."""
    now = utcnow()
    job = session.get(Job, job_id, with_for_update=True)
    if job is None:
        return f"job {job_id} does not exist"
    if job.status in ("succeeded", "failed", "cancelled"):
        return f"job {job_id} is already {job.status}"
    if job.status == "cancelling":
        _cancelled(session, job, "cancelled before it could resume")
        return "cancelled"
    if job.status == "running":
        found = alive(job.worker)
        fresh = job.heartbeat_at is not None and now - job.heartbeat_at < timedelta(
            seconds=heartbeat_timeout_s
        )
        if found is True or (found is None and fresh):
            return f"job {job_id} is running on {job.worker}; duplicate delivery ignored"
        add_event(session, job, "log", f"the run on {job.worker} was lost; taking over")
    if job.attempts >= job.max_attempts:
        detail = (
            f"the worker running this job was lost on attempt {job.attempts} of "
            f"{job.max_attempts} (killed, out of memory, or the machine went away); not retrying"
        )
        fail(session, job, "worker_lost", detail)
        return "failed: attempts exhausted"
    token = _running(session, job, worker, now)
    return _inputs(session, job, token)


def _inputs(session: Session, job: Job, token: str) -> Claim | str:
    model = session.get(ModelFile, job.model_id) if job.model_id else None
    dataset = session.get(DatasetFile, job.dataset_id) if job.dataset_id else None
    eval_ds = session.get(DatasetFile, job.eval_dataset_id) if job.eval_dataset_id else None
    if model is None or dataset is None:
        fail(session, job, "input_deleted", "the job's model or dataset was deleted before it ran")
        return "failed: inputs deleted"
    return Claim(
        token=token,
        tenant_id=job.tenant_id,
        spec=job.spec,
        model=(model.id, model.storage_key, ".onnx"),
        dataset=(dataset.id, dataset.storage_key, dataset.format),
        eval_dataset=(eval_ds.id, eval_ds.storage_key, eval_ds.format) if eval_ds else None,
    )


# ---------------------------------------------------------------- while it runs


def heartbeat(session: Session, job_id: str, token: str, **values: Any) -> str | None:
    """Stamp the heartbeat (and `values`: stage, progress, message) if this run still owns
    the job; the job's status (e.g. `cancelling`), or None when another run owns it now."""
    now = utcnow()
    status: str | None = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.run_token == token)
        .values(heartbeat_at=now, updated_at=now, **values)
        .returning(Job.status)
    ).scalar_one_or_none()
    return status


def owned(session: Session, job_id: str, token: str) -> Job | None:
    """The job, locked, if this run still owns it (None: the reaper gave it away)."""
    job = session.get(Job, job_id, with_for_update=True)
    return job if job is not None and job.run_token == token else None


# ---------------------------------------------------------------- how a run ends


def succeed(
    session: Session,
    job: Job,
    *,
    report: dict[str, Any],
    gates_passed: bool,
    artifacts: dict[str, Any],
    message: str,
) -> None:
    job.stage, job.progress, job.message = "done", 1.0, message
    job.report, job.gates_passed, job.artifacts = report, gates_passed, artifacts
    _succeeded(session, job, message)


def fail(
    session: Session,
    job: Job,
    code: str,
    detail: str,
    *,
    event: str | None = None,
    artifacts: dict[str, Any] | None = None,
) -> None:
    """running (or queued, at claim) → failed; `event` defaults to "code: detail"."""
    if artifacts is not None:
        job.artifacts = artifacts
    _failed(session, job, code, detail, event or f"{code}: {detail}")


def finish_cancelled(session: Session, job: Job, message: str) -> None:
    """cancelling (or running) → cancelled, as the run or the reaper sees it end."""
    _cancelled(session, job, message)


# ---------------------------------------------------------------- the reaper


Reaped = Literal["cancelled", "failed", "requeued"]


def stale_jobs(session: Session, stale_before: datetime) -> list[Job]:
    """Running/cancelling jobs whose heartbeat is older than `stale_before` (locked)."""
    return list(
        session.scalars(
            select(Job)
            .where(Job.status.in_(("running", "cancelling")), Job.heartbeat_at < stale_before)
            .with_for_update(skip_locked=True)
        ).all()
    )


def reap(session: Session, job: Job, now: datetime) -> Reaped:
    """A stale job: cancelling → cancelled; out of attempts → failed; else → queued again."""
    age = (now - job.heartbeat_at).total_seconds() if job.heartbeat_at else float("inf")
    if job.status == "cancelling":
        note = f"the worker stopped while cancelling (no heartbeat for {age:.0f} s)"
        finish_cancelled(session, job, note)
        return "cancelled"
    if job.attempts >= job.max_attempts:
        detail = (
            f"the worker {job.worker} stopped sending heartbeats ({age:.0f} s) on attempt "
            f"{job.attempts} of {job.max_attempts}; giving up. If this repeats the job may "
            "be crashing its worker (e.g. out of memory): try a smaller batch size"
        )
        fail(session, job, "worker_lost", detail)
        return "failed"
    lost = job.worker
    _queued(
        session,
        job,
        f"worker {lost} lost (no heartbeat for {age:.0f} s); re-queued after "
        f"{job.attempts} of {job.max_attempts} attempts",
    )
    return "requeued"


def republished(session: Session, job: Job) -> None:
    """A queued job whose message the broker lost is published again (no state change)."""
    add_event(session, job, "log", "not picked up by a worker; publishing it again")
