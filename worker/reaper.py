"""The reaper (beat, every PRUNERY_REAPER_INTERVAL_S): recovers jobs that would otherwise be
stuck. Running jobs whose heartbeat went stale are re-queued — up to `max_attempts` runs,
then failed with the reason (core.jobs.lifecycle.reap) — queued jobs that the broker lost
are published again, expired artifacts are deleted and orphaned run directories removed.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

from core.db import transaction
from core.jobs import lifecycle
from core.orm import utcnow
from worker.resilience import clean_orphan_runs, expire_artifacts, lost_queued_jobs
from worker.runtime import Runtime

log = logging.getLogger("prunery.worker")


def reap_jobs(rt: Runtime) -> dict[str, list[str]]:
    """One sweep; the ids touched, by what happened to them."""
    settings = rt.settings
    now = utcnow()
    stale_before = now - timedelta(seconds=settings.heartbeat_timeout_s)
    out: dict[str, list[str]] = {"requeued": [], "failed": [], "cancelled": [], "republished": []}
    with transaction(rt.factory) as s:
        for job in lifecycle.stale_jobs(s, stale_before):
            out[lifecycle.reap(s, job, now)].append(job.id)
        for job in lost_queued_jobs(s, settings, now):
            if job.id in out["requeued"]:  # published once below already
                continue
            lifecycle.republished(s, job)
            out["republished"].append(job.id)
    for job_id in out["requeued"] + out["republished"]:
        lifecycle.enqueue(rt.producer, settings, rt.factory, job_id)
    out["expired"] = expire_artifacts(rt.factory, rt.storage, settings)
    out["orphan_runs"] = clean_orphan_runs(rt.factory, Path(settings.worker_cache_dir))
    if any(out.values()):
        log.warning("reaper: %s", {k: v for k, v in out.items() if v})
    return out
