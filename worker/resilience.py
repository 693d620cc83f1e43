"""What keeps the queue fair and the worker alive through outages (torch-free).

* `JobRequest`: a Celery request class whose `revoked()` check — made in the worker's main
  process, when a pool slot is free, just before the message would go to a (fresh) child —
  skips messages of jobs that are already finished or cancelled. Such a message is acked in
  milliseconds (one short query) instead of costing a child process start; submit+cancel
  churn no longer blocks other tenants' jobs.
* `retry_transient`: database/broker calls are retried with backoff while the error is a
  lost connection (Postgres restarting, a network blip); such errors never consume a job
  attempt. `Unclaimable` tells the task to leave its message unacknowledged.
* `lost_queued_jobs`: the reaper's test for "the broker really lost this message", aware of
  the backlog (see its docstring).
* `clean_orphan_runs`: run directories of killed runs are removed; `pid_alive` says whether
  the process a job row names still lives (one answer for the claim and the clean-up).
* `hard_stop`, `expire_artifacts`: a cancelled run that never checks; artifact retention.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy.exc
from celery import Task
from celery.worker.request import Request
from celery.worker.state import task_ready
from sqlalchemy import and_, exists, null, or_, select
from sqlalchemy.orm import Session, aliased

from core.broker import RUN_JOB
from core.jobs.lifecycle import add_event
from core.orm import Job, utcnow
from core.settings import Settings
from core.storage import job_prefix
from prunery.types import ACTIVE, TERMINAL

log = logging.getLogger("prunery.worker")
T = TypeVar("T")


# ---------------------------------------------------------------- transient errors


def is_transient(exc: BaseException) -> bool:
    """A lost or refused database connection (not a bug, not bad data)."""
    if isinstance(exc, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)):
        return True
    if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, sqlalchemy.exc.TimeoutError):  # pool exhausted
        return True
    return isinstance(exc, (ConnectionError, TimeoutError))


class Unclaimable(Exception):
    """The job could not be claimed (the database stayed unreachable): keep the message."""


def retry_transient(
    fn: Callable[[], T],
    what: str,
    budget_s: float = 120.0,
    first_delay_s: float = 0.5,
    max_delay_s: float = 10.0,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call `fn`, retrying transient errors with exponential backoff for up to `budget_s`."""
    deadline = time.monotonic() + budget_s
    delay = first_delay_s
    while True:
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc) or time.monotonic() + delay > deadline:
                raise
            log.warning("%s: %s; retrying in %.1f s", what, type(exc).__name__, delay)
            sleep(delay)
            delay = min(max_delay_s, delay * 2)


# ---------------------------------------------------------------- no-op messages


_parent_engine: Any = None


def _job_status(job_id: str) -> str | None:
    """The job's status, read from the worker's main process over one pooled connection
    (a skip costs one indexed query, ~1 ms). Pool children forked later never use it: they
    drop their inherited copy without closing the parent's socket (see `_after_fork`)."""
    global _parent_engine
    from sqlalchemy import create_engine

    from core.settings import get_settings

    if _parent_engine is None:
        settings = get_settings()
        kwargs: dict[str, Any] = {"pool_size": 1, "max_overflow": 0, "pool_pre_ping": True}
        if not settings.is_sqlite:
            kwargs["connect_args"] = {"connect_timeout": 3}
        _parent_engine = create_engine(settings.database_url, **kwargs)
    with Session(_parent_engine) as s:
        return s.scalar(select(Job.status).where(Job.id == job_id)) or "missing"


def _after_fork() -> None:
    if _parent_engine is not None:
        _parent_engine.dispose(close=False)


os.register_at_fork(after_in_child=_after_fork)


class JobRequest(Request):
    """Skip run_job messages of finished/cancelled jobs before they reach the pool."""

    def revoked(self) -> bool:
        if super().revoked():
            return True
        if self.task_name != RUN_JOB or getattr(self, "_prunery_checked", False):
            return False
        self._prunery_checked = True
        try:
            job_id = str(self.args[0])
            status = _job_status(job_id)
        except Exception as exc:  # the database is down: let the task retry and decide
            log.warning(
                "pre-check of %s failed (%s); running the task", self.id, type(exc).__name__
            )
            return False
        if status in TERMINAL or status == "missing":
            log.info("job %s is %s: message skipped without starting a child", job_id, status)
            task_ready(self)
            self.acknowledge()
            self._already_revoked = True
            return True
        return False


class PruneryTask(Task):
    Request = "worker.resilience:JobRequest"


# ---------------------------------------------------------------- lost messages


def lost_queued_jobs(s: Session, settings: Settings, now: datetime) -> list[Job]:
    """Queued jobs whose message the broker really lost (locked for update).

    A job waiting behind a backlog is not lost: republishing it would only add a duplicate
    at the back of the queue. A message counts as lost when it is older than
    `requeue_queued_after_s` and either
    * a job published after it has already been claimed (the FIFO queue went past it), or
    * no job is running at all (the workers are idle, yet it was not delivered);
    or when it was never published (enqueued_at unset, e.g. the broker was down at submit).
    """
    horizon = now - timedelta(seconds=settings.requeue_queued_after_s)
    never_before = now - timedelta(seconds=min(10.0, settings.requeue_queued_after_s))
    later = aliased(Job)
    passed = exists().where(
        later.enqueued_at > Job.enqueued_at,
        later.started_at.is_not(None),
        later.started_at > Job.enqueued_at,
        later.status != "queued",
    )
    busy = exists().where(later.status.in_(("running", "cancelling")))
    return list(
        s.scalars(
            select(Job)
            .where(
                Job.status == "queued",
                or_(
                    and_(Job.enqueued_at.is_(None), Job.created_at < never_before),
                    and_(Job.enqueued_at < horizon, or_(passed, ~busy)),
                ),
            )
            .with_for_update(skip_locked=True, of=Job)
        ).all()
    )


# ---------------------------------------------------------------- run directories


def worker_id() -> str:
    """How a job row names the process running it."""
    return f"{socket.gethostname()}:{os.getpid()}"


def pid_alive(worker: str | None) -> bool | None:
    """Whether the process `worker` (a `worker_id`) is alive; None when this host cannot
    tell (nothing recorded, or another host or a container sharing the volume)."""
    if not worker or ":" not in worker:
        return None
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_orphan_runs(factory: Any, cache_dir: Path, min_age_s: float = 60.0) -> list[str]:
    """Remove `<cache>/runs/<job_id>-*` directories no live run on this host owns (a run
    killed by SIGKILL/OOM never reaches its `finally`)."""
    runs = Path(cache_dir) / "runs"
    if not runs.is_dir():
        return []
    now = time.time()
    candidates = {}
    for d in runs.iterdir():
        try:
            if d.is_dir() and now - d.stat().st_mtime > min_age_s:
                candidates[d] = d.name.rsplit("-", 1)[0]
        except FileNotFoundError:
            continue
    if not candidates:
        return []
    with factory() as s:
        rows = dict(
            s.execute(
                select(Job.id, Job.worker).where(
                    Job.id.in_(set(candidates.values())), Job.status.in_(ACTIVE)
                )
            ).all()
        )
    removed = []
    for d, job_id in candidates.items():
        worker = rows.get(job_id)
        # Kept while its run may be alive: on another host that is not ours to judge.
        if job_id in rows and worker and ":" in worker and pid_alive(worker) is not False:
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d.name)
    if removed:
        log.warning("removed %d orphaned run directories: %s", len(removed), removed[:5])
    return removed


# ---------------------------------------------------------------- hard stop and retention


def hard_stop(workdir: Path | None, finish: Callable[[], object]) -> None:
    """End a cancelled run whose engine never checked for cancellation: write the final
    `cancelled` state, remove its run directory and terminate this pool child. The worker's
    main process replaces the child; the message (not acked) comes back and is skipped by
    `JobRequest` because the job is finished."""
    import billiard

    if billiard.current_process().name == "MainProcess":
        log.error("cannot hard-stop a job running in the worker's main process (use prefork)")
        return
    try:
        finish()
    except Exception:
        log.exception("hard stop: could not write the cancelled state; the reaper will")
    if workdir is not None:
        shutil.rmtree(workdir, ignore_errors=True)
    log.warning("hard stop: terminating pool child %d", os.getpid())
    logging.shutdown()
    os._exit(0)


def expire_artifacts(factory: Any, storage: Any, settings: Settings) -> list[str]:
    """Delete the artifacts of jobs finished longer than `artifact_retention_days` ago; the
    job row stays (with its report and events) and says so."""
    if settings.artifact_retention_days <= 0:
        return []
    before = utcnow() - timedelta(days=settings.artifact_retention_days)
    expired = []
    with factory() as s, s.begin():
        jobs = s.scalars(
            select(Job)
            .where(Job.finished_at < before, Job.artifacts.is_not(None))
            .limit(500)
            .with_for_update(skip_locked=True)
        ).all()
        for job in jobs:
            if not job.artifacts:
                continue
            storage.delete_prefix(job_prefix(job.tenant_id, job.id))
            job.artifacts = null()  # SQL NULL, not JSON null
            add_event(
                s,
                job,
                "log",
                f"artifacts deleted after the {settings.artifact_retention_days:g}-day retention",
            )
            expired.append(job.id)
    return expired
