"""Jobs over HTTP: submit (validation, idempotency, enqueue after commit), list, get,
cancel, events (SSE and JSON), report and artifacts before a worker has run them."""

from __future__ import annotations

import base64
import json

import pytest
from apikit import REDIS_DB, job_spec


def _queue_messages(client) -> list[dict]:
    import redis
    import servicekit

    r = redis.Redis.from_url(servicekit.redis_url(REDIS_DB))
    queue = client.app.state.settings.job_queue
    return [json.loads(m) for m in r.lrange(queue, 0, -1)]


def test_create_job_is_202_with_location_and_enqueued_by_id(client, uploaded):
    before = len(_queue_messages(client))
    r = client.post(
        "/v1/jobs",
        headers=uploaded["headers"],
        json=job_spec(uploaded["model_id"], uploaded["dataset_id"]),
    )
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["progress"] == 0.0 and job["attempts"] == 0
    assert job["spec"]["method"]["params"] == {  # defaults filled in
        "allocation": "uniform",
        "normalizer": "none",
        "group_reduction": "sum",
        "inputs": True,
    }
    messages = _queue_messages(client)
    assert len(messages) == before + 1
    # kombu's Redis transport LPUSHes: the newest message is first.
    newest = messages[0]
    assert newest["headers"]["task"] == "workers.tasks.run_job"
    args, kwargs, _embed = json.loads(base64.b64decode(newest["body"]))
    assert args == [job["id"]] and kwargs == {}  # the message carries only the job id
    # enqueued after the commit, then stamped
    from core.orm import Job

    with client.app.state.sessionmaker() as s:
        assert s.get(Job, job["id"]).enqueued_at is not None


def test_idempotency_key_makes_retries_safe(client, uploaded):
    h = {**uploaded["headers"], "Idempotency-Key": "retry-me-1"}
    spec = job_spec(uploaded["model_id"], uploaded["dataset_id"])
    first = client.post("/v1/jobs", headers=h, json=spec)
    second = client.post("/v1/jobs", headers=h, json=spec)
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    assert second.headers["idempotent-replayed"] == "true"
    assert client.get("/v1/jobs", headers=uploaded["headers"]).json()["count"] == 1
    # Same key, different body: refused.
    other = client.post("/v1/jobs", headers=h, json={**spec, "target": {"flops": 0.7}})
    assert other.status_code == 409
    assert other.json()["error"] == "idempotency_key_reused"
    # No key: a new job each time.
    client.post("/v1/jobs", headers=uploaded["headers"], json=spec)
    assert client.get("/v1/jobs", headers=uploaded["headers"]).json()["count"] == 2


@pytest.mark.parametrize(
    ("change", "status", "code", "fragment"),
    [
        ({"method": {"name": "nope"}}, 422, "bad_spec", "known methods: "),
        (
            {"method": {"name": "l1_norm", "params": {"allocation": "sideways"}}},
            422,
            "bad_spec",
            "allocation",
        ),
        ({"method": {"name": "l1_norm", "params": {"bogus": 1}}}, 422, "bad_spec", "bogus"),
        ({"target": {"flops": 0.5, "params": 0.5}}, 422, "validation_error", "exactly one"),
        ({"target": {"flops": 1.5}}, 422, "validation_error", "target.flops"),
        ({"recovery": {"epochs": -1}}, 422, "validation_error", "recovery.epochs"),
        ({"unknown_field": 1}, 422, "validation_error", "unknown_field"),
        ({"model_id": "mdl_missing"}, 422, "unknown_model", "POST /v1/models"),
        ({"dataset_id": "ds_missing"}, 422, "unknown_dataset", "POST /v1/datasets"),
        ({"task": "language_modeling"}, 422, "task_mismatch", "task"),
    ],
)
def test_invalid_specs_are_rejected_with_a_fix(client, uploaded, change, status, code, fragment):
    spec = {**job_spec(uploaded["model_id"], uploaded["dataset_id"]), **change}
    r = client.post("/v1/jobs", headers=uploaded["headers"], json=spec)
    assert r.status_code == status, r.text
    assert r.json()["error"] == code
    assert fragment in r.json()["detail"]
    assert client.get("/v1/jobs", headers=uploaded["headers"]).json()["count"] == 0


def test_shape_mismatch_is_422(client, uploaded):
    from apikit import npz_bytes

    h = uploaded["headers"]
    ds = client.post(
        "/v1/datasets", headers=h, files={"file": ("big.npz", npz_bytes(shape=(3, 16, 16)))}
    ).json()
    r = client.post("/v1/jobs", headers=h, json=job_spec(uploaded["model_id"], ds["id"]))
    assert r.status_code == 422
    assert r.json()["error"] == "shape_mismatch"


def test_malformed_json_is_400(client, uploaded):
    r = client.post(
        "/v1/jobs",
        headers={**uploaded["headers"], "Content-Type": "application/json"},
        content=b"{not json",
    )
    assert r.status_code == 400
    assert r.json()["error"] == "bad_json"


def test_list_filters_and_paginates(client, uploaded):
    h = uploaded["headers"]
    spec = job_spec(uploaded["model_id"], uploaded["dataset_id"])
    ids = [client.post("/v1/jobs", headers=h, json=spec).json()["id"] for _ in range(5)]
    client.post(f"/v1/jobs/{ids[0]}/cancel", headers=h)
    page = client.get("/v1/jobs", headers=h, params={"limit": 2, "offset": 0}).json()
    assert page["count"] == 5 and len(page["data"]) == 2 and page["limit"] == 2
    assert [j["id"] for j in page["data"]] == ids[::-1][:2]  # newest first
    rest = client.get("/v1/jobs", headers=h, params={"limit": 10, "offset": 2}).json()
    assert [j["id"] for j in rest["data"]] == ids[::-1][2:]
    queued = client.get("/v1/jobs", headers=h, params={"status": "queued"}).json()
    assert queued["count"] == 4 and all(j["status"] == "queued" for j in queued["data"])
    both = client.get(
        "/v1/jobs", headers=h, params=[("status", "queued"), ("status", "cancelled")]
    ).json()
    assert both["count"] == 5
    bad = client.get("/v1/jobs", headers=h, params={"status": "sleeping"})
    assert bad.status_code == 422 and bad.json()["error"] == "validation_error"
    assert client.get("/v1/jobs", headers=h, params={"limit": 0}).status_code == 422


def test_cancel_queued_job_and_follow_its_events(client, uploaded):
    h = uploaded["headers"]
    job = client.post(
        "/v1/jobs", headers=h, json=job_spec(uploaded["model_id"], uploaded["dataset_id"])
    ).json()
    r = client.post(f"/v1/jobs/{job['id']}/cancel", headers=h)
    assert r.status_code == 202
    assert r.json()["status"] == "cancelled"
    assert r.json()["error"] == {"error": "cancelled", "detail": "cancelled by the user"}
    assert (
        client.post(f"/v1/jobs/{job['id']}/cancel", headers=h).json()["status"] == "cancelled"
    )  # no-op
    events = client.get(
        f"/v1/jobs/{job['id']}/events", headers={**h, "Accept": "application/json"}
    ).json()
    assert [(e["kind"], e["status"]) for e in events] == [
        ("state", "queued"),
        ("state", "cancelled"),
    ]
    after = client.get(
        f"/v1/jobs/{job['id']}/events",
        headers={**h, "Accept": "application/json"},
        params={"after": events[0]["id"]},
    ).json()
    assert [e["id"] for e in after] == [events[1]["id"]]
    with client.stream("GET", f"/v1/jobs/{job['id']}/events", headers=h) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        text = s.read().decode()
    assert f"id: {events[0]['id']}\nevent: state\n" in text
    assert text.rstrip().endswith('event: end\ndata: {"status": "cancelled"}')
    # Last-Event-ID resumes after the given event.
    with client.stream(
        "GET", f"/v1/jobs/{job['id']}/events", headers={**h, "Last-Event-ID": str(events[1]["id"])}
    ) as s:
        assert "event: state" not in s.read().decode()


def test_report_and_artifacts_before_success(client, uploaded):
    h = uploaded["headers"]
    job = client.post(
        "/v1/jobs", headers=h, json=job_spec(uploaded["model_id"], uploaded["dataset_id"])
    ).json()
    r = client.get(f"/v1/jobs/{job['id']}/report", headers=h)
    assert r.status_code == 409 and r.json()["error"] == "report_not_ready"
    r = client.get(f"/v1/jobs/{job['id']}/artifacts/model.onnx", headers=h)
    assert r.status_code == 409 and r.json()["error"] == "artifact_not_ready"
    r = client.get(f"/v1/jobs/{job['id']}/artifacts/secrets.txt", headers=h)
    assert r.status_code == 404 and "model.onnx" in r.json()["detail"]


def test_cancel_finished_job_is_409(client, uploaded):
    from core.db import transaction
    from core.orm import Job

    h = uploaded["headers"]
    job = client.post(
        "/v1/jobs", headers=h, json=job_spec(uploaded["model_id"], uploaded["dataset_id"])
    ).json()
    with transaction(client.app.state.sessionmaker) as s:
        s.get(Job, job["id"]).status = "failed"
    r = client.post(f"/v1/jobs/{job['id']}/cancel", headers=h)
    assert r.status_code == 409 and r.json()["error"] == "job_finished"


def test_too_many_active_jobs_is_429(make_client, new_tenant, onnx_bytes):
    from apikit import npz_bytes

    c = make_client(max_active_jobs_per_tenant=2)
    h = new_tenant()["headers"]
    mid = c.post("/v1/models", headers=h, files={"file": ("n.onnx", onnx_bytes)}).json()["id"]
    did = c.post("/v1/datasets", headers=h, files={"file": ("d.npz", npz_bytes())}).json()["id"]
    spec = job_spec(mid, did)
    assert [c.post("/v1/jobs", headers=h, json=spec).status_code for _ in range(2)] == [202, 202]
    r = c.post("/v1/jobs", headers=h, json=spec)
    assert r.status_code == 429
    assert r.json()["error"] == "too_many_active_jobs"
    assert r.headers["retry-after"] == "30"


def test_rate_limit_is_429_with_retry_after(make_client, new_tenant):
    c = make_client(rate_limit_per_minute=10)  # a fixed one-minute window in Redis
    h = new_tenant()["headers"]
    codes = [c.get("/v1/jobs", headers=h).status_code for _ in range(15)]
    assert codes[:10] == [200] * 10
    assert codes[10:] == [429] * 5
    # The counter lives in Redis: a second API process shares it.
    other = make_client(rate_limit_per_minute=10)
    r = other.get("/v1/jobs", headers=h)
    assert (
        r.status_code == 429
        and r.json()["error"] == "rate_limited"
        and int(r.headers["retry-after"]) >= 1
    )


def _method_names() -> list[str]:
    from methods.registry import list_methods

    return [m.name for m in list_methods()]


@pytest.mark.parametrize("method", _method_names())
def test_every_registered_method_is_accepted_or_refused_with_a_reason(client, uploaded, method):
    """Parametrised over the registry: a new method is covered the moment it is registered."""
    from methods.registry import get_method

    info = get_method(method)
    spec = job_spec(
        uploaded["model_id"], uploaded["dataset_id"], method={"name": method, "params": {}}
    )
    r = client.post("/v1/jobs", headers=uploaded["headers"], json=spec)
    if "classification" not in info.tasks:
        assert r.status_code == 422 and r.json()["error"] == "not_applicable", r.text
        return
    assert r.status_code in (202, 422), r.text
    if r.status_code == 422:
        assert r.json()["error"] in ("not_applicable", "bad_spec") and r.json()["detail"]
    else:
        job = r.json()
        # The stored spec carries the method's defaults, validated by its params schema.
        assert job["spec"]["method"]["params"] == info.params().model_dump(mode="json")
