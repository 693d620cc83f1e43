"""The Celery application: one place for every setting, each with the reason for it.

Start a worker with
    celery -A workers.celery_app worker -Q gpu -c 1            # one process per GPU
and the reaper schedule with
    celery -A workers.celery_app beat                          # once per deployment
(`prunery serve` and the tests run `worker -Q gpu,control -B`, the beat embedded.)

Only the job id travels through the broker; the job row in the database is the truth, so a
lost or duplicated message can neither lose nor double-run a job (see workers/tasks.py).
This module must stay torch-free: the API imports it to publish tasks.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from app.config import Settings, get_settings

RUN_JOB = "workers.tasks.run_job"
REAP = "workers.tasks.reap"
ANALYZE = "workers.side_tasks.analyze_model"
DELIVER_WEBHOOKS = "workers.side_tasks.deliver_webhooks"


def _webhook_sweep_interval() -> float:
    from app.webhooks import get_webhook_settings

    return get_webhook_settings().sweep_interval_s


def make_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    # PruneryTask's request class skips messages of finished/cancelled jobs in the worker's
    # main process, before a pool child is started for them (workers/resilience.py).
    app = Celery(
        "prunery",
        include=["workers.tasks", "workers.side_tasks"],
        task_cls="workers.resilience:PruneryTask",
    )

    transport_options: dict[str, object] = {}
    if settings.broker_url.startswith("filesystem"):
        # kombu's filesystem transport: the embedded default, no broker server. The API and
        # the worker share one folder for messages in both directions.
        folder = settings.broker_folder
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        transport_options = {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "store_processed": False,
            # Broadcast/fanout exchange state (default: ./control in the working directory).
            "control_folder": str(folder / "control"),
        }
    elif settings.broker_url.startswith(("redis", "rediss")):
        transport_options = {
            # Redis re-delivers an unacknowledged message after this long. With acks_late a
            # job's message stays unacked while it runs, so this must exceed the longest job
            # or running jobs would be delivered twice. A worker that dies is recovered much
            # sooner by the heartbeat reaper, not by this timeout.
            "visibility_timeout": settings.job_hard_time_limit_s + 600,
        }

    app.conf.update(
        broker_url=settings.broker_url,
        broker_transport_options=transport_options,
        # Keep retrying the broker at start-up and after a lost connection instead of
        # crashing: the broker may come up after the workers (docker compose).
        broker_connection_retry_on_startup=True,
        broker_connection_retry=True,
        broker_connection_max_retries=None,
        # Publishing from the API: retry briefly, then give up. The job row is already
        # committed; the reaper re-publishes jobs whose enqueue never happened.
        task_publish_retry=True,
        task_publish_retry_policy={
            "max_retries": 3,
            "interval_start": 0.2,
            "interval_step": 0.5,
            "interval_max": 2,
        },
        # No result backend: outcomes live in the jobs table, where the API reads them.
        task_ignore_result=True,
        result_backend=None,
        task_serializer="json",
        accept_content=["json"],
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
        # Jobs go to the `gpu` queue (only GPU workers consume it); the reaper to `control`.
        task_default_queue=settings.control_queue,
        task_queues=(Queue(settings.job_queue), Queue(settings.control_queue)),
        task_routes={
            RUN_JOB: {"queue": settings.job_queue},
            REAP: {"queue": settings.control_queue},
            # Analyses load the model with torch: a worker's queue, but minutes at most.
            ANALYZE: {"queue": settings.job_queue},
            DELIVER_WEBHOOKS: {"queue": settings.control_queue},
        },
        # The reaper: re-queues jobs whose worker stopped heartbeating and re-publishes
        # queued jobs the broker lost. Safe to run from several beats (row locks).
        beat_schedule={
            "reap-stale-jobs": {
                "task": REAP,
                "schedule": settings.reaper_interval_s,
                "options": {"queue": settings.control_queue, "expires": settings.reaper_interval_s},
            },
            # Webhooks: send the due rows of the delivery outbox (app/webhooks.py).
            "deliver-webhooks": {
                "task": DELIVER_WEBHOOKS,
                "schedule": _webhook_sweep_interval(),
                "options": {"queue": settings.control_queue, "expires": _webhook_sweep_interval()},
            },
        },
        # A broker blip must not kill running jobs: their duplicate deliveries are no-ops
        # (the row says the job is running with a fresh heartbeat).
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # Our own logging config, not Celery's hijack of the root logger.
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        # Task events are not needed: progress is written to the database.
        worker_send_task_events=False,
        task_send_sent_event=False,
        timezone="UTC",
        enable_utc=True,
    )
    return app


app = make_celery()
