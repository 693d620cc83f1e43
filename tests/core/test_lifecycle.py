"""Every job state transition of core.jobs.lifecycle, in-process, on SQLite and Postgres."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from core.db import transaction
from core.jobs import lifecycle
from core.orm import DatasetFile, Job, JobEvent, ModelFile, Tenant, WebhookDelivery, utcnow
from core.settings import Settings

HOOK = {"url": "https://hooks.example.com/x", "events": ["running", "cancelled", "failed"]}


def _seed(factory: Any, **job_fields: Any) -> str:
    """A tenant, a model, a dataset and a submitted job; the job's id."""
    with transaction(factory) as s:
        tenant = Tenant(name=f"t-{uuid.uuid4().hex[:10]}")
        s.add(tenant)
        s.flush()
        common = dict(tenant_id=tenant.id, sha256="0" * 64, size_bytes=1, summary={})
        model = ModelFile(filename="m.onnx", storage_key="k/m.onnx", **common)
        data = DatasetFile(filename="d.npz", format=".npz", storage_key="k/d.npz", **common)
        s.add_all([model, data])
        s.flush()
        fields: dict[str, Any] = dict(spec={"method": {"name": "x"}}, max_attempts=2)
        fields.update(job_fields)
        job = lifecycle.new_job(
            tenant_id=tenant.id, model_id=model.id, dataset_id=data.id, **fields
        )
        s.add(job)
        s.flush()
        lifecycle.submitted(s, job)
        return job.id


def _job(factory: Any, job_id: str) -> Job:
    with factory() as s:
        job = s.get(Job, job_id)
        assert job is not None
        s.expunge(job)
        return job


def _states(factory: Any, job_id: str) -> list[tuple[str | None, str | None]]:
    with factory() as s:
        rows = s.scalars(
            select(JobEvent)
            .where(JobEvent.job_id == job_id, JobEvent.kind == "state")
            .order_by(JobEvent.id)
        ).all()
        return [(e.status, e.message) for e in rows]


def _claim(factory: Any, job_id: str, alive: bool | None = None, worker: str = "h:1") -> Any:
    with transaction(factory) as s:
        return lifecycle.claim(
            s, job_id, worker=worker, heartbeat_timeout_s=60.0, alive=lambda _: alive
        )


def _running(factory: Any, **fields: Any) -> tuple[str, str]:
    job_id = _seed(factory, **fields)
    claim = _claim(factory, job_id)
    assert isinstance(claim, lifecycle.Claim)
    return job_id, claim.token


def test_submit(factory: Any) -> None:
    job_id = _seed(factory)
    job = _job(factory, job_id)
    assert (job.status, job.progress, job.attempts) == ("queued", 0.0, 0)
    assert _states(factory, job_id) == [("queued", "queued")]


class _Producer:
    def __init__(self, fail: bool = False) -> None:
        self.sent: list[tuple[str, list[str], str]] = []
        self.fail = fail

    def send_task(self, name: str, args: list[str], queue: str, **_: Any) -> None:
        if self.fail:
            raise ConnectionError("broker down")
        self.sent.append((name, args, queue))


def test_enqueue_stamps_and_survives_a_broker_outage(factory: Any) -> None:
    settings = Settings(environment="test", job_queue="gpu-x")
    job_id = _seed(factory)
    assert not lifecycle.enqueue(_Producer(fail=True), settings, factory, job_id)
    assert _job(factory, job_id).enqueued_at is None
    producer = _Producer()
    assert lifecycle.enqueue(producer, settings, factory, job_id)
    assert producer.sent == [("workers.tasks.run_job", [job_id], "gpu-x")]
    assert _job(factory, job_id).enqueued_at is not None


def test_cancel_a_queued_job(factory: Any) -> None:
    job_id = _seed(factory)
    with transaction(factory) as s:
        job = s.get(Job, job_id)
        assert job is not None
        lifecycle.request_cancel(s, job)
    job = _job(factory, job_id)
    assert (job.status, job.error_code, job.error_detail) == (
        "cancelled",
        "cancelled",
        "cancelled by the user",
    )
    assert job.finished_at is not None
    assert _states(factory, job_id)[-1] == ("cancelled", "cancelled before it started")
    with transaction(factory) as s:  # cancelling a cancelled job is a no-op
        lifecycle.request_cancel(s, s.get(Job, job_id))  # type: ignore[arg-type]
    assert len(_states(factory, job_id)) == 2


def test_cancel_a_running_job_then_the_run_ends(factory: Any) -> None:
    job_id, token = _running(factory)
    for _ in range(2):  # the second request is a no-op
        with transaction(factory) as s:
            lifecycle.request_cancel(s, s.get(Job, job_id))  # type: ignore[arg-type]
    assert _job(factory, job_id).status == "cancelling"
    with transaction(factory) as s:
        assert lifecycle.heartbeat(s, job_id, token) == "cancelling"
    with transaction(factory) as s:
        job = lifecycle.owned(s, job_id, token)
        assert job is not None
        lifecycle.finish_cancelled(s, job, "cancelled while running")
    job = _job(factory, job_id)
    assert (job.status, job.error_code, job.run_token) == ("cancelled", "cancelled", None)
    assert [st for st, _ in _states(factory, job_id)] == [
        "queued",
        "running",
        "cancelling",
        "cancelled",
    ]


@pytest.mark.parametrize("end", ["succeeded", "failed"])
def test_cancel_a_finished_job_is_refused(factory: Any, end: str) -> None:
    job_id, token = _running(factory)
    with transaction(factory) as s:
        job = lifecycle.owned(s, job_id, token)
        assert job is not None
        if end == "failed":
            lifecycle.fail(s, job, "bad_model", "no")
        else:
            lifecycle.succeed(s, job, report={}, gates_passed=True, artifacts={}, message="ok")
    with transaction(factory) as s:
        with pytest.raises(lifecycle.AlreadyFinished) as err:
            lifecycle.request_cancel(s, s.get(Job, job_id))  # type: ignore[arg-type]
    assert str(err.value) == f"job {job_id} already {end}; there is nothing to cancel"


def test_claim(factory: Any) -> None:
    job_id = _seed(factory)
    claim = _claim(factory, job_id, worker="host:42")
    assert isinstance(claim, lifecycle.Claim)
    job = _job(factory, job_id)
    assert (job.status, job.attempts, job.worker, job.stage) == ("running", 1, "host:42", "load")
    assert job.run_token == claim.token and job.started_at and job.heartbeat_at
    assert claim.model[1:] == ("k/m.onnx", ".onnx") and claim.eval_dataset is None
    assert _states(factory, job_id)[-1] == ("running", "running on host:42 (attempt 1 of 2)")
    # A duplicate delivery while the run is alive does nothing.
    assert "duplicate delivery ignored" in _claim(factory, job_id, alive=True)
    assert _claim(factory, "job_missing") == "job job_missing does not exist"


def test_claim_takes_over_a_lost_run_then_gives_up(factory: Any) -> None:
    job_id, first = _running(factory)
    second = _claim(factory, job_id, alive=False, worker="h:2")
    assert isinstance(second, lifecycle.Claim) and second.token != first
    assert _job(factory, job_id).attempts == 2
    with transaction(factory) as s:  # the first run notices it lost the job
        assert lifecycle.heartbeat(s, job_id, first) is None
        assert lifecycle.owned(s, job_id, first) is None
    assert _claim(factory, job_id, alive=False) == "failed: attempts exhausted"
    job = _job(factory, job_id)
    assert (job.status, job.error_code, job.run_token) == ("failed", "worker_lost", None)
    assert _claim(factory, job_id) == f"job {job_id} is already failed"


def test_claim_of_a_cancelling_job_cancels_it(factory: Any) -> None:
    job_id, _ = _running(factory)
    with transaction(factory) as s:
        lifecycle.request_cancel(s, s.get(Job, job_id))  # type: ignore[arg-type]
    assert _claim(factory, job_id, alive=False) == "cancelled"
    assert _states(factory, job_id)[-1] == ("cancelled", "cancelled before it could resume")


def test_claim_with_deleted_inputs_fails(factory: Any) -> None:
    job_id = _seed(factory)
    with transaction(factory) as s:
        job = s.get(Job, job_id)
        assert job is not None
        job.model_id = None
    assert _claim(factory, job_id) == "failed: inputs deleted"
    assert _job(factory, job_id).error_code == "input_deleted"


def test_heartbeat_writes_progress(factory: Any) -> None:
    job_id, token = _running(factory)
    with transaction(factory) as s:
        status = lifecycle.heartbeat(s, job_id, token, stage="prune", progress=0.5, message="hi")
    assert status == "running"
    job = _job(factory, job_id)
    assert (job.stage, job.progress, job.message) == ("prune", 0.5, "hi")


def test_succeed_and_fail(factory: Any) -> None:
    job_id, token = _running(factory)
    with transaction(factory) as s:
        job = lifecycle.owned(s, job_id, token)
        assert job is not None
        lifecycle.succeed(
            s, job, report={"a": 1}, gates_passed=False, artifacts={"m": {}}, message="meh"
        )
    job = _job(factory, job_id)
    assert (job.status, job.stage, job.progress, job.gates_passed) == (
        "succeeded",
        "done",
        1.0,
        False,
    )
    assert (job.report, job.artifacts, job.run_token) == ({"a": 1}, {"m": {}}, None)
    assert job.finished_at is not None and job.error_code is None

    job_id, token = _running(factory)
    with transaction(factory) as s:
        job = lifecycle.owned(s, job_id, token)
        assert job is not None
        lifecycle.fail(s, job, "budget_unreachable", "too much", artifacts={"analysis.json": {}})
    job = _job(factory, job_id)
    assert (job.status, job.error_code, job.error_detail) == (
        "failed",
        "budget_unreachable",
        "too much",
    )
    assert job.artifacts == {"analysis.json": {}}
    assert _states(factory, job_id)[-1] == ("failed", "budget_unreachable: too much")


def test_reap(factory: Any) -> None:
    long_ago = utcnow() - timedelta(hours=1)
    requeue, _ = _running(factory)
    give_up, _ = _running(factory, max_attempts=1)
    cancel, _ = _running(factory)
    fresh, _ = _running(factory)
    with transaction(factory) as s:
        lifecycle.request_cancel(s, s.get(Job, cancel))  # type: ignore[arg-type]
        for job_id in (requeue, give_up, cancel):
            s.get(Job, job_id).heartbeat_at = long_ago  # type: ignore[union-attr]
    now = utcnow()
    with transaction(factory) as s:
        stale = lifecycle.stale_jobs(s, now - timedelta(minutes=5))
        assert fresh not in {j.id for j in stale}
        got = {j.id: lifecycle.reap(s, j, now) for j in stale if j.id in (requeue, give_up, cancel)}
    assert got == {requeue: "requeued", give_up: "failed", cancel: "cancelled"}
    job = _job(factory, requeue)
    assert (job.status, job.run_token, job.worker, job.stage, job.progress) == (
        "queued",
        None,
        None,
        None,
        0.0,
    )
    assert "re-queued after 1 of 2 attempts" in (_states(factory, requeue)[-1][1] or "")
    assert _job(factory, give_up).error_code == "worker_lost"
    assert _job(factory, cancel).error_detail == "cancelled by the user"
    with transaction(factory) as s:
        lifecycle.republished(s, s.get(Job, requeue))  # type: ignore[arg-type]


def test_state_changes_fill_the_webhook_outbox(factory: Any) -> None:
    job_id, token = _running(factory, spec={"webhook": HOOK})
    with transaction(factory) as s:
        job = lifecycle.owned(s, job_id, token)
        assert job is not None
        lifecycle.fail(s, job, "bad_model", "no")
    with factory() as s:
        events = s.scalars(
            select(WebhookDelivery.event).where(WebhookDelivery.job_id == job_id)
        ).all()
    assert sorted(events) == ["failed", "running"]
