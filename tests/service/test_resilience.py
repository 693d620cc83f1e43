"""Cancellation of a running job, a worker killed mid-job (SIGKILL) and a message the
broker lost: no job is lost or stuck."""

from __future__ import annotations

import signal

import pytest
from e2ekit import spec, wait_for

from prunery.errors import JobCancelled, JobFailed

pytestmark = pytest.mark.service


def _running_in(job, stages: set[str]):
    job.refresh()
    return job.status == "running" and job.stage in stages


def test_cancel_a_running_job(sdk, uploaded, stack):
    job = sdk.jobs.create(spec(uploaded, recovery={"epochs": 200, "batch_size": 16}))
    wait_for(lambda: _running_in(job, {"recover"}), timeout=300)
    job.cancel()
    assert job.status in ("cancelling", "cancelled")
    with pytest.raises(JobCancelled):
        job.wait(timeout=120, poll_interval=0.2)
    assert job.status == "cancelled"
    assert job.error.error == "cancelled"
    states = [e.status for e in job.events() if e.kind == "state"]
    assert states == ["queued", "running", "cancelling", "cancelled"]
    # The worker is still healthy: the next job runs.
    nxt = sdk.jobs.create(spec(uploaded, recovery={"epochs": 0}))
    assert nxt.wait(timeout=400).status == "succeeded"


def test_killed_worker_job_reruns_to_success(sdk, uploaded, stack):
    job = sdk.jobs.create(spec(uploaded, recovery={"epochs": 4, "batch_size": 32}))
    wait_for(lambda: _running_in(job, {"recover"}), timeout=300)
    assert job.attempts == 1
    stack.kill_worker(signal.SIGKILL)  # main process, pool child and beat: no goodbye
    stack.start_worker()
    job.wait(timeout=400, poll_interval=0.5)
    assert job.status == "succeeded"
    assert job.attempts == 2
    messages = [e.message or "" for e in job.events()]
    assert any("lost" in m and "re-queued" in m for m in messages), messages
    states = [e.status for e in job.events() if e.kind == "state"]
    assert states == ["queued", "running", "queued", "running", "succeeded"]


def test_killed_every_attempt_fails_with_reason(sdk, uploaded, stack):
    job = sdk.jobs.create(spec(uploaded, recovery={"epochs": 200, "batch_size": 16}))
    for attempt in (1, 2):  # settings: max_attempts=2
        wait_for(
            lambda a=attempt: (
                _running_in(job, {"load", "analyse", "prune", "recover"}) and job.attempts == a
            ),
            timeout=300,
        )
        stack.kill_worker(signal.SIGKILL)
        stack.start_worker()
    with pytest.raises(JobFailed):
        job.wait(timeout=300, poll_interval=0.5)
    assert job.status == "failed"
    assert job.error.error == "worker_lost"
    assert "attempt 2 of 2" in job.error.detail


def test_message_lost_by_the_broker_is_republished(sdk, uploaded, stack):
    import redis
    import servicekit
    from e2ekit import REDIS_DB

    stack.kill_worker(signal.SIGTERM)
    job = sdk.jobs.create(spec(uploaded, recovery={"epochs": 0}))
    r = redis.Redis.from_url(servicekit.redis_url(REDIS_DB))
    assert r.llen(stack.settings.job_queue) >= 1
    r.delete(stack.settings.job_queue)  # the broker forgets the message
    stack.start_worker()
    job.wait(timeout=400, poll_interval=0.5)
    assert job.status == "succeeded"
    assert any("publishing it again" in (e.message or "") for e in job.events())


def test_killed_pool_child_is_redelivered_and_rerun(sdk, uploaded, stack):
    """The OOM-killer case: only the pool child dies. acks_late + reject_on_worker_lost put
    the message back, and the same worker takes the job over at once (no reaper wait)."""
    import os

    job = sdk.jobs.create(spec(uploaded, recovery={"epochs": 4, "batch_size": 32}))
    wait_for(lambda: _running_in(job, {"recover"}), timeout=300)
    from core.db import make_engine, make_sessionmaker
    from core.orm import Job

    engine = make_engine(stack.settings)
    with make_sessionmaker(engine)() as s:
        worker = s.get(Job, job.id).worker
    engine.dispose()
    child_pid = int(worker.rpartition(":")[2])
    assert child_pid != stack.worker.pid
    os.kill(child_pid, signal.SIGKILL)
    job.wait(timeout=400, poll_interval=0.5)
    assert job.status == "succeeded"
    assert job.attempts == 2
    messages = [e.message or "" for e in job.events()]
    assert any("was lost; taking over" in m for m in messages), messages
    assert stack.worker.poll() is None  # the worker itself survived
