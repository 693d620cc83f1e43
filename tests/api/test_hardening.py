"""Hostile requests that used to answer 500 or run bombs inside the API: each is now a 4xx
with the documented error shape, decided from headers without decoding anything.

Over 400 lines on purpose: one short, independent test per hostile request, in one place."""

from __future__ import annotations

import json
import time

import hostile
import pytest
from apikit import job_spec, npz_bytes


def _is_error(r, status: int, code: str | None = None) -> dict:  # type: ignore[no-untyped-def, type-arg]
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error", "detail"}, body
    if code is not None:
        assert body["error"] == code, body
    return body


# ------------------------------------------------------------------ numbers and strings


@pytest.mark.parametrize("path", ["/v1/models", "/v1/datasets", "/v1/jobs"])
def test_offset_past_bigint_is_422(client, tenant, path):
    _is_error(client.get(path, headers=tenant["headers"], params={"offset": 2**63}), 422)


def test_events_after_and_last_event_id_overflow_are_4xx(client, uploaded):
    h = uploaded["headers"]
    job = client.post(
        "/v1/jobs", headers=h, json=job_spec(uploaded["model_id"], uploaded["dataset_id"])
    )
    url = f"/v1/jobs/{job.json()['id']}/events"
    json_h = {**h, "Accept": "application/json"}
    _is_error(client.get(url, headers=json_h, params={"after": 2**63}), 422)
    assert client.get(url, headers=json_h, params={"after": 2**63 - 1}).json() == []
    _is_error(client.get(url, headers={**json_h, "Last-Event-ID": str(2**63)}), 400, "bad_request")
    _is_error(client.get(url, headers={**json_h, "Last-Event-ID": "9" * 60}), 400)
    r = client.get(url, headers={**json_h, "Last-Event-ID": "9" * 5000})
    assert 400 <= r.status_code < 500 and set(r.json()) == {"error", "detail"}
    _is_error(client.get(url, headers={**json_h, "Last-Event-ID": "١٢".encode()}), 400)
    assert client.get(url, headers={**json_h, "Last-Event-ID": "1"}).status_code == 200


@pytest.mark.parametrize("ident", ["job_%00", "a%00b", "x" * 300, "%E2%98%83"])
def test_odd_path_ids_are_404(client, tenant, ident):
    h = tenant["headers"]
    for path in (f"/v1/jobs/{ident}", f"/v1/models/{ident}", f"/v1/datasets/{ident}"):
        _is_error(client.get(path, headers=h), 404, "not_found")
    _is_error(client.post(f"/v1/jobs/{ident}/cancel", headers=h), 404)
    _is_error(client.delete(f"/v1/jobs/{ident}", headers=h), 404)


def test_nul_and_non_finite_numbers_in_a_spec_are_422(client, uploaded):
    h = {**uploaded["headers"], "Content-Type": "application/json"}
    spec = job_spec(uploaded["model_id"], uploaded["dataset_id"])
    for bad in (
        {**spec, "model_id": "mdl_\u0000"},
        {**spec, "method": {"name": "l1_norm", "params": {"x\u0000": 1}}},
        {**spec, "method": {"name": "l1_norm\u0000", "params": {}}},
    ):
        _is_error(client.post("/v1/jobs", headers=h, content=json.dumps(bad)), 422)
    for token in ("NaN", "Infinity", "-Infinity"):
        raw = json.dumps({**spec, "data": {"mean": [0.5]}}).replace("0.5", token)
        _is_error(client.post("/v1/jobs", headers=h, content=raw), 422)
        raw = json.dumps({**spec, "method": {"name": "l1_norm", "params": {"p": 0.5}}})
        _is_error(client.post("/v1/jobs", headers=h, content=raw.replace("0.5", token)), 422)


@pytest.mark.parametrize("size", [[0, 0], [-1, 8], [10**9, 10**9], [1025, 8]])
def test_job_image_size_out_of_bounds_is_422(client, uploaded, size):
    spec = job_spec(uploaded["model_id"], uploaded["dataset_id"], data={"image_size": size})
    body = _is_error(client.post("/v1/jobs", headers=uploaded["headers"], json=spec), 422)
    assert "image_size" in body["detail"]


@pytest.mark.parametrize("value", ["0,0", "-1,8", "8,-1", "1000000000,1", "2000,2000", "٣,٣"])
def test_upload_image_size_out_of_bounds_is_422(client, tenant, value):
    r = client.post(
        "/v1/datasets",
        headers=tenant["headers"],
        files={"file": ("imgs.zip", hostile.tiny_png_zip())},
        data={"image_size": value},
    )
    _is_error(r, 422)


def test_image_size_in_bounds_is_accepted(client, tenant):
    r = client.post(
        "/v1/datasets",
        headers=tenant["headers"],
        files={"file": ("imgs.zip", hostile.tiny_png_zip())},
        data={"image_size": "16,12"},
    )
    assert r.status_code == 201, r.text
    assert r.json()["sample_shape"] == [3, 16, 12] and r.json()["classes"] == ["c0", "c1"]


def test_long_multipart_boundary_is_400_without_staging_leftovers(client, tenant):
    staging = client.app.state.storage.staging_dir()
    before = set(staging.iterdir())
    boundary = "b" * 300
    body = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.onnx"\r\n\r\nabc\r\n--{boundary}--\r\n'
    r = client.post(
        "/v1/models",
        headers={**tenant["headers"], "Content-Type": f"multipart/form-data; boundary={boundary}"},
        content=body.encode(),
    )
    _is_error(r, 400, "bad_request")
    assert set(staging.iterdir()) == before


def test_nul_in_upload_filename_never_reaches_the_database(client, tenant):
    r = client.post(
        "/v1/datasets",
        headers=tenant["headers"],
        files={"file": ("da\x00ta.npz", npz_bytes())},
    )
    assert r.status_code == 201, r.text
    assert "\x00" not in r.json()["filename"]


def test_json_body_over_the_limit_is_413(client, tenant):
    r = client.post(
        "/v1/jobs",
        headers={**tenant["headers"], "Content-Type": "application/json"},
        content=b"[" + b"1," * 600_000 + b"1]",
    )
    _is_error(r, 413, "payload_too_large")


# ------------------------------------------------------------------ bombs (headers only)


def _upload(client, h, name, data):  # type: ignore[no-untyped-def]
    return client.post("/v1/datasets", headers=h, files={"file": (name, data)})


def test_npy_header_declaring_1e12_elements_is_422(client, tenant):
    body = _is_error(_upload(client, tenant["headers"], "d.npz", hostile.npz_declaring()), 422)
    assert "declares" in body["detail"] and body["error"] == "bad_dataset"


def test_compressed_npz_bomb_is_422(client, tenant):
    t0 = time.perf_counter()
    body = _is_error(_upload(client, tenant["headers"], "d.npz", hostile.npz_bomb(64)), 422)
    assert "bomb" in body["detail"]
    assert time.perf_counter() - t0 < 5  # refused from the zip directory, not by inflating it


def test_zip_of_81_megapixel_pngs_is_422(client, tenant):
    body = _is_error(_upload(client, tenant["headers"], "i.zip", hostile.zip_of_huge_pngs()), 422)
    assert "Mpx" in body["detail"]


def test_targz_declaring_a_gigabyte_member_is_422(client, tenant):
    body = _is_error(_upload(client, tenant["headers"], "i.tar.gz", hostile.targz_declaring()), 422)
    assert "bomb" in body["detail"]


def test_the_worker_refuses_the_same_bombs_before_decoding(tmp_path):
    from core.errors import BadDataset
    from core.validation.datasets import load_dataset

    for name, data in (
        ("a.npz", hostile.npz_declaring()),
        ("b.npz", hostile.npz_bomb(64)),
        ("c.zip", hostile.zip_of_huge_pngs()),
        ("d.tar.gz", hostile.targz_declaring()),
    ):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(BadDataset):
            load_dataset(tmp_path / name)


def test_header_summary_matches_the_decoded_dataset(tmp_path):
    """The API's header-only summary says what the worker will load."""
    import numpy as np

    from core.validation.dataset_checks import inspect_dataset
    from core.validation.datasets import load_dataset

    (tmp_path / "d.npz").write_bytes(npz_bytes(n_train=30, n_test=7, shape=(3, 5, 4)))
    (tmp_path / "i.zip").write_bytes(hostile.tiny_png_zip(size=6, n=4))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "xy.npz", x=rng.random((50, 6), dtype=np.float32), y=rng.integers(0, 7, 50))
    np.savez(
        tmp_path / "lm.npz", train=rng.integers(0, 90, (20, 9)), test=rng.integers(0, 90, (5, 9))
    )
    for name, task in (
        ("d.npz", "classification"),
        ("i.zip", "classification"),
        ("xy.npz", "classification"),
        ("lm.npz", "language_modeling"),
    ):
        summary = inspect_dataset(tmp_path / name, task=task).describe()
        ds = load_dataset(tmp_path / name, task=task)
        expected = ds.describe()
        if task == "language_modeling":
            expected["num_classes"] = ds.vocab_size
        assert summary == expected, name


# ------------------------------------------------------------------ quotas, deletion, limits


def test_submit_cancel_churn_hits_the_queued_cap(make_client, new_tenant, onnx_bytes):
    c = make_client(max_queued_jobs_per_tenant=3)
    h = new_tenant()["headers"]
    m = c.post("/v1/models", headers=h, files={"file": ("n.onnx", onnx_bytes)}).json()["id"]
    d = c.post("/v1/datasets", headers=h, files={"file": ("d.npz", npz_bytes())}).json()["id"]
    for _ in range(3):
        job = c.post("/v1/jobs", headers=h, json=job_spec(m, d))
        assert job.status_code == 202, job.text
        assert (
            c.post(f"/v1/jobs/{job.json()['id']}/cancel", headers=h).json()["status"] == "cancelled"
        )
    r = c.post("/v1/jobs", headers=h, json=job_spec(m, d))
    _is_error(r, 429, "too_many_queued_jobs")
    assert int(r.headers["retry-after"]) > 0


def test_delete_job_removes_row_events_and_artifacts(client, uploaded):
    h = uploaded["headers"]
    job = client.post(
        "/v1/jobs", headers=h, json=job_spec(uploaded["model_id"], uploaded["dataset_id"])
    ).json()
    _is_error(client.delete(f"/v1/jobs/{job['id']}", headers=h), 409, "job_active")
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=h)
    storage = client.app.state.storage
    from core.storage import job_prefix

    artifact = storage.root / job_prefix(uploaded["tenant_id"], job["id"]) / "model.onnx"
    artifact.parent.mkdir(parents=True)
    artifact.write_bytes(b"x")
    assert client.delete(f"/v1/jobs/{job['id']}", headers=h).status_code == 204
    assert not artifact.exists()
    _is_error(client.get(f"/v1/jobs/{job['id']}", headers=h), 404)


def test_storage_quota_is_429(make_client, new_tenant):
    c = make_client(storage_quota_bytes_per_tenant=len(npz_bytes()) + 100)
    h = new_tenant()["headers"]
    assert (
        c.post("/v1/datasets", headers=h, files={"file": ("a.npz", npz_bytes())}).status_code == 201
    )
    r = c.post("/v1/datasets", headers=h, files={"file": ("b.npz", npz_bytes(seed=1))})
    _is_error(r, 429, "storage_quota")
    assert r.headers["retry-after"]


def test_uploads_per_hour_quota_is_429(make_client, new_tenant):
    c = make_client(uploads_per_hour_per_tenant=2)
    h = new_tenant()["headers"]
    for seed in range(2):
        assert (
            c.post(
                "/v1/datasets", headers=h, files={"file": ("a.npz", npz_bytes(seed=seed))}
            ).status_code
            == 201
        )
    r = c.post("/v1/datasets", headers=h, files={"file": ("a.npz", npz_bytes(seed=9))})
    _is_error(r, 429, "upload_quota")


def test_failed_auth_is_rate_limited_per_address(make_client):
    c = make_client(failed_auth_per_minute=5)
    codes = [
        c.get("/v1/models", headers={"Authorization": f"Bearer pk_bad_{i}"}).status_code
        for i in range(7)
    ]
    assert codes[:5] == [401] * 5 and codes[5:] == [429, 429]


def test_metrics_token_and_bounded_labels(make_client):
    c = make_client(metrics_token="s3cret-metrics")
    _is_error(c.get("/metrics"), 401)
    c.request("FROBNICATE", "/v1/models")
    c.get(f"/nope/{time.time()}")
    text = c.get("/metrics", headers={"Authorization": "Bearer s3cret-metrics"}).text
    assert "FROBNICATE" not in text and "/nope/" not in text
    assert 'method="other"' in text and 'route="unmatched"' in text
    off = make_client(metrics_enabled=False)
    _is_error(off.get("/metrics"), 404)


def test_readyz_hides_error_text(make_client):
    c = make_client(database_url="postgresql+psycopg://nobody:pw@127.0.0.1:1/none")
    r = c.get("/readyz")
    assert r.status_code == 503
    assert r.json()["checks"]["database"] == "unavailable"
    assert "127.0.0.1" not in r.text and "connection" not in r.text.lower()


def test_production_refuses_default_passwords_and_wildcard_proxies():
    from pydantic import ValidationError

    from core.settings import Settings

    good = {
        "environment": "production",
        "database_url": "postgresql+psycopg://prunery:Zq81-long-random@db/prunery",
        "broker_url": "redis://redis:6379/0",
    }
    Settings(**good)
    for bad in (
        {"database_url": "postgresql+psycopg://prunery:prunery@db/prunery"},
        {"database_url": "postgresql+psycopg://prunery@db/prunery"},
        {"forwarded_allow_ips": "*"},
    ):
        with pytest.raises(ValidationError, match="unsafe production settings"):
            Settings(**{**good, **bad})


def test_openapi_documents_422_as_the_error_body(client):
    schema = client.get("/openapi.json").json()
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            if "422" in op["responses"]:
                ref = op["responses"]["422"]["content"]["application/json"]["schema"]["$ref"]
                assert ref.endswith("/ErrorBody"), (path, method)
    data_spec = schema["components"]["schemas"]["DataSpec"]["properties"]["image_size"]
    assert data_spec["anyOf"][0]["prefixItems"][0]["maximum"] == 1024


# ------------------------------------------------------------------ worker-side helpers


def _job_row(s, tenant_id: str, **values):  # type: ignore[no-untyped-def]
    from core.orm import Job

    job = Job(tenant_id=tenant_id, spec={}, attempts=0, max_attempts=3, **values)
    s.add(job)
    s.flush()
    return job


def test_reaper_republishes_only_really_lost_messages(client, tenant):
    """A job waiting behind a running one is not lost; once a job published after it has
    been claimed (the queue went past it) or the workers are idle, it is."""
    from datetime import timedelta

    from core.db import transaction
    from core.orm import Job, utcnow
    from worker.resilience import lost_queued_jobs

    factory = client.app.state.sessionmaker
    settings = client.app.state.settings.model_copy(update={"requeue_queued_after_s": 60})
    now = utcnow()
    old = now - timedelta(minutes=5)
    with transaction(factory) as s:
        s.query(Job).filter(Job.status.in_(("queued", "running", "cancelling"))).update(
            {"status": "cancelled"}, synchronize_session=False
        )
        waiting = _job_row(s, tenant["tenant_id"], status="queued", enqueued_at=old, created_at=old)
        busy = _job_row(
            s,
            tenant["tenant_id"],
            status="running",
            enqueued_at=old - timedelta(minutes=1),
            started_at=old,
            heartbeat_at=now,
        )
        fresh = _job_row(s, tenant["tenant_id"], status="queued", enqueued_at=now, created_at=now)
        never = _job_row(
            s, tenant["tenant_id"], status="queued", created_at=now - timedelta(minutes=1)
        )
        ids = {waiting.id, busy.id, fresh.id, never.id}
    with transaction(factory) as s:
        lost = {j.id for j in lost_queued_jobs(s, settings, utcnow())} & ids
    assert lost == {never.id}  # waiting sits behind a busy worker: not lost
    with transaction(factory) as s:  # a job published after `waiting` was claimed
        _job_row(
            s,
            tenant["tenant_id"],
            status="succeeded",
            enqueued_at=old + timedelta(seconds=5),
            started_at=old + timedelta(seconds=10),
        )
    with transaction(factory) as s:
        lost = {j.id for j in lost_queued_jobs(s, settings, utcnow())} & ids
    assert lost == {never.id, waiting.id}
    with transaction(factory) as s:
        for j in s.query(Job).filter(Job.id.in_(ids)):
            j.status = "cancelled"


def test_orphaned_run_dirs_and_expired_artifacts_are_removed(client, tenant, tmp_path):
    import os
    import socket
    from datetime import timedelta

    from core.db import transaction
    from core.orm import Job, utcnow
    from core.storage import job_prefix
    from worker.resilience import clean_orphan_runs, expire_artifacts

    factory = client.app.state.sessionmaker
    storage = client.app.state.storage
    with transaction(factory) as s:
        live = _job_row(
            s, tenant["tenant_id"], status="running", worker=f"{socket.gethostname()}:{os.getpid()}"
        )
        dead = _job_row(
            s, tenant["tenant_id"], status="running", worker=f"{socket.gethostname()}:999999999"
        )
        done = _job_row(
            s,
            tenant["tenant_id"],
            status="succeeded",
            finished_at=utcnow() - timedelta(days=3),
            artifacts={"model.onnx": {"key": "k", "size": 1}},
        )
        ids = (live.id, dead.id, done.id)
    runs = tmp_path / "runs"
    for job_id in ids:
        (runs / f"{job_id}-abc").mkdir(parents=True)
    removed = clean_orphan_runs(factory, tmp_path, min_age_s=0)
    assert sorted(removed) == sorted([f"{dead.id}-abc", f"{done.id}-abc"])
    assert (runs / f"{live.id}-abc").is_dir()

    artifact = storage.root / job_prefix(tenant["tenant_id"], done.id) / "model.onnx"
    artifact.parent.mkdir(parents=True)
    artifact.write_bytes(b"x")
    settings = client.app.state.settings
    assert expire_artifacts(factory, storage, settings) == []  # retention off
    expired = expire_artifacts(
        factory, storage, settings.model_copy(update={"artifact_retention_days": 1})
    )
    assert done.id in expired and not artifact.exists()
    with transaction(factory) as s:
        assert s.get(Job, done.id).artifacts is None
        for job_id in ids:
            s.get(Job, job_id).status = "cancelled"


def test_transient_errors_are_retried_with_backoff_and_others_are_not():
    import sqlalchemy.exc

    from worker.resilience import retry_transient

    calls, sleeps = [], []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 4:
            raise sqlalchemy.exc.OperationalError("SELECT 1", {}, ConnectionRefusedError())
        return "ok"

    assert retry_transient(flaky, "test", sleep=sleeps.append) == "ok"
    assert sleeps == [0.5, 1.0, 2.0]
    with pytest.raises(ValueError):
        retry_transient(
            lambda: (_ for _ in ()).throw(ValueError("bug")), "test", sleep=sleeps.append
        )
    with pytest.raises(sqlalchemy.exc.OperationalError):  # the budget runs out
        retry_transient(
            lambda: (_ for _ in ()).throw(sqlalchemy.exc.OperationalError("x", {}, OSError())),
            "test",
            budget_s=0.0,
            sleep=sleeps.append,
        )
