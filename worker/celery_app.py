"""The consumer Celery application: every worker setting, each with the reason for it.

Start a worker with
    celery -A worker.celery_app worker -Q gpu -c 1            # one process per GPU
and the reaper schedule with
    celery -A worker.celery_app beat                          # once per deployment
(`prunery serve` and the tests run `worker -Q gpu,control -B`, the beat embedded.)

Nothing happens at import: `celery -A worker.celery_app` asks this module for `app`, and
the module-level `__getattr__` builds it then (reading the settings, creating the broker
folder of the filesystem transport). Publishers do not need this module: they use
`core.broker.make_producer`. The task names and routes are in core/broker.py.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from celery import Celery

from core.broker import DELIVER_WEBHOOKS, REAP, producer_config
from core.settings import Settings, get_settings


def _webhook_sweep_interval() -> float:
    from core.webhooks import get_webhook_settings

    return get_webhook_settings().sweep_interval_s


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """The periodic tasks (run by `beat`); each is safe to run from several beats."""
    sweep = _webhook_sweep_interval()
    return {
        # The reaper: re-queues jobs whose worker stopped heartbeating and re-publishes
        # queued jobs the broker lost (row locks make concurrent reapers harmless).
        "reap-stale-jobs": {
            "task": REAP,
            "schedule": settings.reaper_interval_s,
            "options": {"queue": settings.control_queue, "expires": settings.reaper_interval_s},
        },
        # Webhooks: send the due rows of the delivery outbox (core/webhooks.py).
        "deliver-webhooks": {
            "task": DELIVER_WEBHOOKS,
            "schedule": sweep,
            "options": {"queue": settings.control_queue, "expires": sweep},
        },
    }


def worker_config(settings: Settings) -> dict[str, Any]:
    """What a consuming worker adds to the producer's settings."""
    return dict(
        # Acknowledge a message only after the task returns, so a worker that dies mid-job
        # does not silently drop it...
        task_acks_late=True,
        # ...and when the pool child running it is killed (OOM, SIGKILL), requeue the
        # message instead of acknowledging it as failed.
        task_reject_on_worker_lost=True,
        # Reserve only the message being run: jobs take minutes to hours and a prefetched
        # job would wait behind a long one while another worker sits idle.
        worker_prefetch_multiplier=1,
        # One GPU, one job at a time per worker process; scale with more workers.
        worker_concurrency=1,
        # A fresh child per job (default 1): frees GPU/host memory that torch caches would
        # otherwise keep, and isolates a job that corrupted the process. Costs ~1-2 s of
        # start-up per job (children fork from a parent that preloaded the engine).
        worker_max_tasks_per_child=settings.worker_max_tasks_per_child or None,
        # Soft limit: SoftTimeLimitExceeded is raised in the task, which marks the job failed
        # with a clear reason. Hard limit: the child is killed if it ignores the soft one.
        task_soft_time_limit=settings.job_soft_time_limit_s,
        task_time_limit=settings.job_hard_time_limit_s,
        beat_schedule=beat_schedule(settings),
        # A broker blip must not kill running jobs: their duplicate deliveries are no-ops
        # (the row says the job is running with a fresh heartbeat).
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # Our own logging config, not Celery's hijack of the root logger.
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        # Task events are not needed: progress is written to the database.
        worker_send_task_events=False,
    )


def make_celery(settings: Settings | None = None) -> Celery:
    """The worker's app. The tasks are `shared_task`s in worker.tasks / worker.side_tasks,
    imported by the worker at start (`include`); PruneryTask's request class skips messages
    of finished/cancelled jobs in the main process, before a pool child is started for them
    (worker/resilience.py)."""
    settings = settings or get_settings()
    app = Celery(
        "prunery",
        include=["worker.tasks", "worker.side_tasks"],
        task_cls="worker.resilience:PruneryTask",
    )
    app.conf.update(producer_config(settings))
    app.conf.update(worker_config(settings))
    return app


@lru_cache(maxsize=1)
def get_app() -> Celery:
    """The process's worker app, built on first use."""
    return make_celery()


def __getattr__(name: str) -> Celery:
    # `celery -A worker.celery_app` looks up `app` (then `celery`) on this module.
    if name in ("app", "celery"):
        return get_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
