"""Celery tasks, kept thin: look the job up, run the engine, write what happens to the row.

* `run_job(job_id)`: claims the job row (queued → running) under a row lock, fetches its
  inputs from storage, calls `workers.engine.run`, stores the artifacts and the report.
  Progress, heartbeats and log events are written to the database as the engine reports
  them; a `cancelling` row stops the engine at its next progress call.
* `reap()`: (beat, every PRUNERY_REAPER_INTERVAL_S) re-queues running jobs whose heartbeat
  went stale — up to `max_attempts` runs, then fails them with the reason — and
  re-publishes queued jobs that the broker lost.

Every run holds a `run_token`; a run that lost its job to the reaper (it was presumed dead)
notices on its next write and stops without touching the row.

Torch is imported only inside `run_job` (via the engine), never at module import.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from celery.exceptions import Reject, SoftTimeLimitExceeded
from celery.signals import worker_init, worker_process_init, worker_ready
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings, get_settings
from app.db import make_engine, make_sessionmaker, transaction
from app.jobs import ARTIFACT_NAME, add_event, enqueue, set_state
from app.models import TERMINAL, DatasetFile, Job, JobEvent, ModelFile, utcnow
from app.storage import Storage, job_prefix, make_storage
from workers.celery_app import REAP, RUN_JOB
from workers.celery_app import app as celery_app
from workers.errors import Cancelled, EngineError
from workers.resilience import (
    Unclaimable,
    clean_orphan_runs,
    expire_artifacts,
    hard_stop,
    is_transient,
    lost_queued_jobs,
    retry_transient,
)

log = logging.getLogger("prunery.worker")


@dataclass
class Runtime:
    settings: Settings
    factory: sessionmaker[Session]
    storage: Storage


_runtime: Runtime | None = None


def runtime() -> Runtime:
    """Per-process database engine and storage (created after fork, never inherited)."""
    global _runtime
    if _runtime is None:
        settings = get_settings()
        _runtime = Runtime(
            settings, make_sessionmaker(make_engine(settings)), make_storage(settings)
        )
    return _runtime


@worker_init.connect
def _preload_engine(**_: Any) -> None:
    """Import the engine (torch, onnx2torch: seconds) once in the worker's main process, so
    every pool child forked from it starts warm. Importing torch does not initialise CUDA,
    so forking afterwards is safe."""
    if get_settings().worker_preload_engine:
        import workers.engine.pipeline  # noqa: F401


@worker_ready.connect
def _clean_runs(**_: Any) -> None:
    """Run directories left by runs that were killed before this worker started."""
    try:
        rt = runtime()
        clean_orphan_runs(rt.factory, Path(rt.settings.worker_cache_dir), min_age_s=0)
    except Exception:
        log.exception("could not clean orphaned run directories")


@worker_process_init.connect
def _reset_after_fork(**_: Any) -> None:
    global _runtime
    _runtime = None


class LostOwnership(Cancelled):
    """The reaper gave this job to another run; this one must stop without writing."""


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _pid_alive(worker: str | None) -> bool | None:
    """Whether the process that ran a job on *this* host is alive (None: other host)."""
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


def _fail(session: Session, job: Job, code: str, detail: str) -> None:
    job.error_code, job.error_detail = code, detail
    job.finished_at = utcnow()
    job.run_token = None
    set_state(session, job, "failed", f"{code}: {detail}")


def claim(rt: Runtime, job_id: str) -> tuple[str, dict[str, Any]] | str:
    """Take the job for this run: (run_token, details) or a reason to do nothing."""
    now = utcnow()
    stale = timedelta(seconds=rt.settings.heartbeat_timeout_s)
    with transaction(rt.factory) as s:
        job = s.get(Job, job_id, with_for_update=True)
        if job is None:
            return f"job {job_id} does not exist"
        if job.status in TERMINAL:
            return f"job {job_id} is already {job.status}"
        if job.status == "cancelling":
            job.error_code, job.error_detail = "cancelled", "cancelled by the user"
            job.finished_at = now
            set_state(s, job, "cancelled", "cancelled before it could resume")
            return "cancelled"
        if job.status == "running":
            alive = _pid_alive(job.worker)
            fresh = job.heartbeat_at is not None and now - job.heartbeat_at < stale
            if alive is True or (alive is None and fresh):
                return f"job {job_id} is running on {job.worker}; duplicate delivery ignored"
            add_event(s, job, "log", f"the run on {job.worker} was lost; taking over")
        if job.attempts >= job.max_attempts:
            _fail(
                s,
                job,
                "worker_lost",
                f"the worker running this job was lost on attempt {job.attempts} of "
                f"{job.max_attempts} (killed, out of memory, or the machine went away); not retrying",
            )
            return "failed: attempts exhausted"
        token = uuid.uuid4().hex
        job.run_token = token
        job.attempts += 1
        job.worker = _worker_id()
        job.started_at = job.started_at or now
        job.heartbeat_at = now
        job.stage, job.progress, job.message = "load", 0.0, None
        job.error_code = job.error_detail = None
        set_state(
            s,
            job,
            "running",
            f"running on {job.worker} (attempt {job.attempts} of {job.max_attempts})",
        )
        model = s.get(ModelFile, job.model_id) if job.model_id else None
        dataset = s.get(DatasetFile, job.dataset_id) if job.dataset_id else None
        eval_ds = s.get(DatasetFile, job.eval_dataset_id) if job.eval_dataset_id else None
        if model is None or dataset is None:
            _fail(s, job, "input_deleted", "the job's model or dataset was deleted before it ran")
            return "failed: inputs deleted"
        details = {
            "tenant_id": job.tenant_id,
            "spec": job.spec,
            "model": (model.id, model.storage_key, ".onnx"),
            "dataset": (dataset.id, dataset.storage_key, dataset.format),
            "eval_dataset": (eval_ds.id, eval_ds.storage_key, eval_ds.format) if eval_ds else None,
        }
        return token, details


class JobReporter:
    """The engine's progress callback plus a heartbeat thread, both writing to the row."""

    def __init__(self, rt: Runtime, job_id: str, token: str, workdir: Path | None = None) -> None:
        self.rt, self.job_id, self.token, self.workdir = rt, job_id, token, workdir
        self._cancel_seen: float | None = None
        self.cancel = threading.Event()
        self.lost = threading.Event()
        self.stop = threading.Event()
        self._last_write = 0.0
        self._last_event_progress = -1.0
        self._stage: str | None = None
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> JobReporter:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self._thread.join(timeout=5)

    def _touch(self, **values: Any) -> None:
        """Update the row if this run still owns it; note cancellation or lost ownership."""
        with transaction(self.rt.factory) as s:
            status = s.execute(
                update(Job)
                .where(Job.id == self.job_id, Job.run_token == self.token)
                .values(heartbeat_at=utcnow(), updated_at=utcnow(), **values)
                .returning(Job.status)
            ).scalar_one_or_none()
            if status is None:
                self.lost.set()
            elif status == "cancelling":
                self.cancel.set()

    def _beat(self) -> None:
        while not self.stop.wait(self.rt.settings.heartbeat_interval_s):
            try:
                self._touch()
            except Exception:  # the database may blip; the next beat retries
                log.exception("heartbeat for %s failed", self.job_id)
            if self.cancel.is_set() and not self.stop.is_set():
                # Hard stop: a stage that never reports progress cannot see the cancel.
                self._cancel_seen = self._cancel_seen or time.monotonic()
                if time.monotonic() - self._cancel_seen >= self.rt.settings.cancel_grace_s:
                    grace = self.rt.settings.cancel_grace_s
                    note = (
                        f"cancelled: the engine did not stop within {grace:g} s of the "
                        "request, so its process was terminated"
                    )
                    hard_stop(
                        self.workdir,
                        lambda note=note: _finish(
                            self.rt,
                            self.job_id,
                            self.token,
                            status="cancelled",
                            error_code="cancelled",
                            error_detail="cancelled by the user",
                            event_message=note,
                        ),
                    )

    def check(self) -> None:
        if self.lost.is_set():
            raise LostOwnership("another run owns this job now")
        if self.cancel.is_set():
            raise Cancelled("cancelled by the user")

    def __call__(self, stage: str, fraction: float, message: str | None = None) -> None:
        self.check()
        now = time.monotonic()
        fraction = min(1.0, max(0.0, float(fraction)))
        new_stage = stage != self._stage
        interval = self.rt.settings.progress_min_interval_s
        # Stage changes are always written; log lines at most 5x as often as plain progress,
        # so an engine that reports every batch cannot flood the database.
        since = now - self._last_write
        if not (new_stage or since >= interval or (message and since >= interval / 5)):
            return
        self._last_write = now
        self._stage = stage
        try:
            self._write(stage, fraction, message, new_stage)
        except Exception as exc:
            if not is_transient(exc):
                raise
            # Progress is best effort: a database blip must not fail the job. The heartbeat
            # thread keeps trying, and the next progress call writes again.
            log.warning("job %s: progress write failed; continuing", self.job_id, exc_info=True)
            self._stage = None
        self.check()

    def _write(self, stage: str, fraction: float, message: str | None, new_stage: bool) -> None:
        with transaction(self.rt.factory) as s:
            status = s.execute(
                update(Job)
                .where(Job.id == self.job_id, Job.run_token == self.token)
                .values(
                    stage=stage,
                    progress=fraction,
                    message=message if message else Job.message,
                    heartbeat_at=utcnow(),
                    updated_at=utcnow(),
                )
                .returning(Job.status)
            ).scalar_one_or_none()
            if status is None:
                self.lost.set()
            else:
                if status == "cancelling":
                    self.cancel.set()
                # Events: every stage change and message, and each 1% of progress.
                if new_stage or message or fraction - self._last_event_progress >= 0.01:
                    self._last_event_progress = fraction
                    job = Job(id=self.job_id, status=status, stage=stage, progress=fraction)
                    add_event(s, job, "log" if message else "progress", message or stage)


class InputMissing(Exception):
    pass


def _fetch(rt: Runtime, key: str, dest: Path) -> Path:
    """A local path of a stored input (the local store's own file, or a downloaded copy)."""
    try:
        return rt.storage.get_file(key, dest)
    except FileNotFoundError:
        raise InputMissing(key) from None
    except Exception as exc:  # botocore's 404 is a ClientError
        if "404" in str(exc) or "Not Found" in str(exc):
            raise InputMissing(key) from None
        raise


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _keep_traceback(rt: Runtime, job_id: str) -> None:
    """Store the traceback of an internal error for the operator, as a `debug` event: the
    public API never returns those (tenants see the one-line error);
    `python -m app.admin job-debug JOB_ID` prints it."""
    try:
        with transaction(rt.factory) as s:
            s.add(JobEvent(job_id=job_id, kind="debug", message=traceback.format_exc()[-20000:]))
    except Exception:  # noqa: BLE001 - the failure itself is recorded by the caller
        log.warning("job %s: could not store the traceback", job_id, exc_info=True)


def _finish(rt: Runtime, job_id: str, token: str, **values: Any) -> bool:
    """Write the outcome if this run still owns the job (waiting out a database outage)."""
    return retry_transient(
        lambda: _finish_once(rt, job_id, token, dict(values)),
        f"finish {job_id}",
        budget_s=max(300.0, rt.settings.heartbeat_timeout_s),
    )


def _finish_once(rt: Runtime, job_id: str, token: str, values: dict[str, Any]) -> bool:
    status: str = values.pop("status")
    message: str = values.pop("event_message", status)
    with transaction(rt.factory) as s:
        job = s.get(Job, job_id, with_for_update=True)
        if job is None or job.run_token != token:
            log.warning(
                "job %s: this run lost ownership; its outcome (%s) is discarded", job_id, status
            )
            return False
        for k, v in values.items():
            setattr(job, k, v)
        job.finished_at = utcnow()
        job.run_token = None
        set_state(s, job, status, message)
    return True


def execute(rt: Runtime, job_id: str) -> str:
    try:
        # A database outage is waited out here; it never costs the job an attempt.
        claimed = retry_transient(lambda: claim(rt, job_id), f"claim {job_id}")
    except Exception as exc:
        if is_transient(exc):
            raise Unclaimable(job_id) from exc
        raise
    if isinstance(claimed, str):
        log.info("job %s: %s", job_id, claimed)
        return claimed
    token, d = claimed
    settings = rt.settings
    cache = Path(settings.worker_cache_dir)
    workdir = Path(tempfile.mkdtemp(prefix=f"{job_id}-", dir=_ensure(cache / "runs")))
    try:
        with JobReporter(rt, job_id, token, workdir) as reporter:
            try:
                from prunery.spec import JobSpec
                from workers.engine import run as run_engine  # torch is imported here

                spec = JobSpec.model_validate(d["spec"])
                model_id, model_key, _ = d["model"]
                ds_id, ds_key, ds_suffix = d["dataset"]
                model_path = _fetch(rt, model_key, cache / "inputs" / f"{model_id}.onnx")
                data_path = _fetch(rt, ds_key, cache / "inputs" / f"{ds_id}{ds_suffix}")
                reporter("load", 0.0, "inputs ready; starting the engine")
                out_dir = workdir / "out"
                out_dir.mkdir()
                eval_path = None
                if d.get("eval_dataset"):
                    ev_id, ev_key, ev_suffix = d["eval_dataset"]
                    eval_path = _fetch(rt, ev_key, cache / "inputs" / f"{ev_id}{ev_suffix}")
                report = run_engine(
                    spec, model_path, data_path, out_dir, progress=reporter, eval_data_path=eval_path
                )
                reporter.check()
            except LostOwnership:
                return "lost ownership"
            except Cancelled:
                _finish(
                    rt,
                    job_id,
                    token,
                    status="cancelled",
                    error_code="cancelled",
                    error_detail="cancelled by the user",
                    event_message="cancelled while running",
                )
                return "cancelled"
            except EngineError as exc:
                from workers.side_tasks import PARTIAL_ARTIFACTS

                _finish(
                    rt,
                    job_id,
                    token,
                    status="failed",
                    error_code=exc.code,
                    error_detail=exc.message,
                    # e.g. budget_unreachable: the analysis (excluded layers, reasons) stays readable
                    artifacts=store_outputs(
                        rt, job_prefix(d["tenant_id"], job_id), workdir / "out",
                        only=PARTIAL_ARTIFACTS, best_effort=True,
                    )
                    or None,
                    event_message=f"{exc.code}: {exc.message}",
                )
                return f"failed: {exc.code}"
            except InputMissing as exc:
                detail = (
                    f"an input file is missing from storage ({exc}); upload it again and resubmit"
                )
                _finish(
                    rt,
                    job_id,
                    token,
                    status="failed",
                    error_code="input_missing",
                    error_detail=detail,
                    event_message=detail,
                )
                return "failed: input missing"
            except SoftTimeLimitExceeded:
                detail = (
                    f"the job ran past the time limit of {settings.job_soft_time_limit_s} s; "
                    "ask for fewer epochs or raise PRUNERY_JOB_SOFT_TIME_LIMIT_S"
                )
                _finish(
                    rt,
                    job_id,
                    token,
                    status="failed",
                    error_code="time_limit",
                    error_detail=detail,
                    event_message=detail,
                )
                return "failed: time limit"
            except Exception as exc:
                log.exception("job %s crashed", job_id)
                _keep_traceback(rt, job_id)
                detail = f"the engine crashed ({type(exc).__name__}: {exc}); this is a bug, please report it"
                _finish(
                    rt,
                    job_id,
                    token,
                    status="failed",
                    error_code="internal_error",
                    error_detail=detail[:2000],
                    event_message=detail[:2000],
                )
                return "failed: internal error"

            artifacts = store_outputs(rt, job_prefix(d["tenant_id"], job_id), out_dir)
            gates_passed = report.gates_passed
            missed = [
                f"{g.name}: {g.value:g} > limit {g.limit:g}" for g in report.gates if not g.passed
            ]
            message = (
                "succeeded" if gates_passed else "succeeded, but gates missed: " + "; ".join(missed)
            )
            _finish(
                rt,
                job_id,
                token,
                status="succeeded",
                stage="done",
                progress=1.0,
                report=report.model_dump(mode="json"),
                gates_passed=gates_passed,
                artifacts=artifacts,
                message=message,
                event_message=message,
            )
            return "succeeded" if gates_passed else "succeeded (gates missed)"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def store_outputs(
    rt: Runtime, prefix: str, out_dir: Path, only: tuple[str, ...] | None = None, best_effort: bool = False
) -> dict[str, dict[str, Any]]:
    """Store every file the engine wrote to its output directory, under the same name
    `prunery prune` gives it (model.onnx, report.json, report.md, and whatever a method adds,
    e.g. search_curves.png): one code path for the CLI and the service. A failed run stores
    `only` what is worth reading (its analysis), `best_effort`: the failure is what matters."""
    artifacts: dict[str, dict[str, Any]] = {}
    if not out_dir.is_dir():
        return artifacts
    for path in sorted(out_dir.iterdir()):
        if only is not None and path.name not in only:
            continue
        if not path.is_file() or path.is_symlink() or not ARTIFACT_NAME.fullmatch(path.name):
            log.warning("not storing %s: artifacts are plain files with simple names", path.name)
            continue
        try:
            entry = {"key": f"{prefix}/{path.name}", "size": path.stat().st_size, "sha256": _sha256(path)}
            rt.storage.put_file(path, entry["key"])  # may move the file: measure it first
        except Exception:
            if not best_effort:
                raise
            log.exception("could not store %s", path.name)
            continue
        artifacts[path.name] = entry
    return artifacts


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def reap_jobs(rt: Runtime) -> dict[str, list[str]]:
    """Recover jobs that would otherwise be stuck: see the module docstring."""
    settings = rt.settings
    now = utcnow()
    stale_before = now - timedelta(seconds=settings.heartbeat_timeout_s)
    out: dict[str, list[str]] = {"requeued": [], "failed": [], "cancelled": [], "republished": []}
    with transaction(rt.factory) as s:
        stale = s.scalars(
            select(Job)
            .where(Job.status.in_(("running", "cancelling")), Job.heartbeat_at < stale_before)
            .with_for_update(skip_locked=True)
        ).all()
        for job in stale:
            age = (now - job.heartbeat_at).total_seconds() if job.heartbeat_at else float("inf")
            if job.status == "cancelling":
                job.error_code, job.error_detail = "cancelled", "cancelled by the user"
                job.finished_at, job.run_token = now, None
                set_state(
                    s,
                    job,
                    "cancelled",
                    f"the worker stopped while cancelling (no heartbeat for {age:.0f} s)",
                )
                out["cancelled"].append(job.id)
            elif job.attempts >= job.max_attempts:
                _fail(
                    s,
                    job,
                    "worker_lost",
                    f"the worker {job.worker} stopped sending heartbeats ({age:.0f} s) on attempt "
                    f"{job.attempts} of {job.max_attempts}; giving up. If this repeats the job may "
                    "be crashing its worker (e.g. out of memory): try a smaller batch size",
                )
                out["failed"].append(job.id)
            else:
                lost = job.worker
                job.run_token, job.worker = None, None
                job.stage, job.progress, job.message = None, 0.0, None
                set_state(
                    s,
                    job,
                    "queued",
                    f"worker {lost} lost (no heartbeat for {age:.0f} s); re-queued after "
                    f"{job.attempts} of {job.max_attempts} attempts",
                )
                out["requeued"].append(job.id)
        for job in lost_queued_jobs(s, settings, now):
            if job.id in out["requeued"]:  # published once below already
                continue
            add_event(s, job, "log", "not picked up by a worker; publishing it again")
            out["republished"].append(job.id)
    celery = celery_app
    for job_id in out["requeued"] + out["republished"]:
        enqueue(celery, settings, rt.factory, job_id)
    out["expired"] = expire_artifacts(rt.factory, rt.storage, settings)
    out["orphan_runs"] = clean_orphan_runs(rt.factory, Path(settings.worker_cache_dir))
    if any(out.values()):
        log.warning("reaper: %s", {k: v for k, v in out.items() if v})
    return out


@celery_app.task(name=RUN_JOB, bind=True)
def run_job(self: Any, job_id: str) -> str:
    """Run one job by id (the row is the truth; the message carries nothing else)."""
    try:
        return execute(runtime(), job_id)
    except Unclaimable:
        # Not acked: the message goes back to the queue and is delivered again later.
        log.warning("job %s: database unreachable at claim; message requeued", job_id)
        raise Reject(f"job {job_id} could not be claimed", requeue=True) from None


@celery_app.task(name=REAP)
def reap() -> dict[str, list[str]]:
    return reap_jobs(runtime())
