"""The producer side of Celery: what the API and the reaper need to publish a task.

Only the job id travels through the broker; the job row in the database is the truth, so a
lost or duplicated message can neither lose nor double-run a job (core/jobs/lifecycle.py).

The task names are wire strings: messages already in a queue during a rolling deploy carry
them, so they keep their historical `workers.` spelling whatever the modules are called.
Nothing happens at import: `make_producer(settings)` builds an app when asked.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Queue

from core.settings import Settings

RUN_JOB = "workers.tasks.run_job"
REAP = "workers.tasks.reap"
ANALYZE = "workers.side_tasks.analyze_model"
DELIVER_WEBHOOKS = "workers.side_tasks.deliver_webhooks"


def transport_options(settings: Settings) -> dict[str, Any]:
    """Broker transport options; for the filesystem transport its folders are created."""
    if settings.broker_url.startswith("filesystem"):
        # kombu's filesystem transport: the embedded default, no broker server. The API and
        # the worker share one folder for messages in both directions.
        folder = settings.broker_folder
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "store_processed": False,
            # Broadcast/fanout exchange state (default: ./control in the working directory).
            "control_folder": str(folder / "control"),
        }
    if settings.broker_url.startswith(("redis", "rediss")):
        # Redis re-delivers an unacknowledged message after this long. With acks_late a
        # job's message stays unacked while it runs, so this must exceed the longest job
        # or running jobs would be delivered twice. A worker that dies is recovered much
        # sooner by the heartbeat reaper, not by this timeout.
        return {"visibility_timeout": settings.job_hard_time_limit_s + 600}
    return {}


def routes(settings: Settings) -> dict[str, dict[str, str]]:
    """Jobs go to the `gpu` queue (only GPU workers consume it); the reaper to `control`."""
    return {
        RUN_JOB: {"queue": settings.job_queue},
        REAP: {"queue": settings.control_queue},
        # Analyses load the model with torch: a worker's queue, but minutes at most.
        ANALYZE: {"queue": settings.job_queue},
        DELIVER_WEBHOOKS: {"queue": settings.control_queue},
    }


def producer_config(settings: Settings) -> dict[str, Any]:
    """The settings a publisher needs (the worker's app adds its own on top)."""
    return dict(
        broker_url=settings.broker_url,
        broker_transport_options=transport_options(settings),
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
        task_default_queue=settings.control_queue,
        task_queues=(Queue(settings.job_queue), Queue(settings.control_queue)),
        task_routes=routes(settings),
        task_send_sent_event=False,
        timezone="UTC",
        enable_utc=True,
    )


def make_producer(settings: Settings) -> Celery:
    """A Celery app that only publishes (the API's `app.state.celery`, the reaper's)."""
    app = Celery("prunery", set_as_current=False)
    app.conf.update(producer_config(settings))
    return app
