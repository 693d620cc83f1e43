"""The job tasks, kept thin: each looks the job up by id and calls one function.

* `run_job(job_id)` → `worker.runner.execute` (claim, run the engine, write the outcome).
* `reap()` → `worker.reaper.reap_jobs` (stale heartbeats, lost messages, retention).

The tasks are `shared_task`s: they bind to the worker's app (worker/celery_app.py) when it
is built, so importing this module builds no app and imports no torch. The signal handlers
below prepare each worker process.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from celery import shared_task
from celery.exceptions import Reject
from celery.signals import worker_init, worker_process_init, worker_ready

from core.broker import REAP, RUN_JOB
from core.settings import get_settings
from worker import runtime as runtimes
from worker.reaper import reap_jobs
from worker.resilience import Unclaimable, clean_orphan_runs
from worker.runner import execute

log = logging.getLogger("prunery.worker")


@worker_init.connect
def _preload_engine(**_: Any) -> None:
    """Import the engine (torch, onnx2torch: seconds) once in the worker's main process, so
    every pool child forked from it starts warm. Importing torch does not initialise CUDA,
    so forking afterwards is safe."""
    if get_settings().worker_preload_engine:
        import engine.pipeline  # noqa: F401


@worker_ready.connect
def _clean_runs(**_: Any) -> None:
    """Run directories left by runs that were killed before this worker started."""
    try:
        rt = runtimes.runtime()
        clean_orphan_runs(rt.factory, Path(rt.settings.worker_cache_dir), min_age_s=0)
    except Exception:
        log.exception("could not clean orphaned run directories")


@worker_process_init.connect
def _reset_after_fork(**_: Any) -> None:
    runtimes.reset()


@shared_task(name=RUN_JOB, bind=True)
def run_job(self: Any, job_id: str) -> str:
    """Run one job by id (the row is the truth; the message carries nothing else)."""
    try:
        return execute(runtimes.runtime(), job_id)
    except Unclaimable:
        # Not acked: the message goes back to the queue and is delivered again later.
        log.warning("job %s: database unreachable at claim; message requeued", job_id)
        raise Reject(f"job {job_id} could not be claimed", requeue=True) from None


@shared_task(name=REAP)
def reap() -> dict[str, list[str]]:
    return reap_jobs(runtimes.runtime())
