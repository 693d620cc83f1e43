"""Authentication and tenant isolation on every endpoint."""

from __future__ import annotations

import pytest
from apikit import job_spec

PROTECTED = [
    ("GET", "/v1/models"),
    ("POST", "/v1/models"),
    ("GET", "/v1/models/mdl_x"),
    ("DELETE", "/v1/models/mdl_x"),
    ("GET", "/v1/datasets"),
    ("POST", "/v1/datasets"),
    ("GET", "/v1/datasets/ds_x"),
    ("DELETE", "/v1/datasets/ds_x"),
    ("GET", "/v1/jobs"),
    ("POST", "/v1/jobs"),
    ("GET", "/v1/jobs/job_x"),
    ("POST", "/v1/jobs/job_x/cancel"),
    ("GET", "/v1/jobs/job_x/events"),
    ("GET", "/v1/jobs/job_x/report"),
    ("GET", "/v1/jobs/job_x/artifacts/model.onnx"),
]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_missing_key_is_401_with_error_shape(client, method, path):
    r = client.request(method, path)
    assert r.status_code == 401
    assert r.json()["error"] == "unauthorized"
    assert "Bearer" in r.json()["detail"]
    assert r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_unknown_key_is_401(client, method, path):
    r = client.request(method, path, headers={"Authorization": "Bearer pk_nope_nope"})
    assert r.status_code == 401
    assert r.json() == {"error": "invalid_api_key", "detail": "unknown or revoked API key"}


def test_wrong_scheme_is_401(client, tenant):
    r = client.get("/v1/models", headers={"Authorization": f"Basic {tenant['key']}"})
    assert r.status_code == 401
    assert "Bearer" in r.json()["detail"]


def test_revoked_key_is_401(client, tenant):
    from core.db import transaction
    from core.orm import ApiKey, utcnow

    assert client.get("/v1/models", headers=tenant["headers"]).status_code == 200
    with transaction(client.app.state.sessionmaker) as s:
        s.get(ApiKey, tenant["key_id"]).revoked_at = utcnow()
    assert client.get("/v1/models", headers=tenant["headers"]).status_code == 401


def test_keys_are_stored_hashed(client, tenant):
    from sqlalchemy import select

    from app.security import hash_key
    from core.orm import ApiKey

    with client.app.state.sessionmaker() as s:
        row = s.scalar(select(ApiKey).where(ApiKey.id == tenant["key_id"]))
    assert row.key_hash == hash_key(tenant["key"])
    assert tenant["key"] not in (row.key_hash, row.prefix, row.name)


def test_other_tenants_resources_are_404(client, uploaded, new_tenant):
    a = uploaded
    r = client.post("/v1/jobs", headers=a["headers"], json=job_spec(a["model_id"], a["dataset_id"]))
    assert r.status_code == 202
    job_id = r.json()["id"]
    b = new_tenant()["headers"]
    for path in (
        f"/v1/models/{a['model_id']}",
        f"/v1/datasets/{a['dataset_id']}",
        f"/v1/jobs/{job_id}",
        f"/v1/jobs/{job_id}/events",
        f"/v1/jobs/{job_id}/report",
        f"/v1/jobs/{job_id}/artifacts/model.onnx",
    ):
        r = client.get(path, headers=b)
        assert r.status_code == 404, path
        assert r.json()["error"] == "not_found"
    assert client.delete(f"/v1/models/{a['model_id']}", headers=b).status_code == 404
    assert client.delete(f"/v1/datasets/{a['dataset_id']}", headers=b).status_code == 404
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=b).status_code == 404
    # Listings are scoped too.
    assert client.get("/v1/models", headers=b).json()["count"] == 0
    assert client.get("/v1/datasets", headers=b).json()["count"] == 0
    assert client.get("/v1/jobs", headers=b).json()["count"] == 0
    # And another tenant's inputs cannot be used in a job.
    r = client.post("/v1/jobs", headers=b, json=job_spec(a["model_id"], a["dataset_id"]))
    assert r.status_code == 422
    assert r.json()["error"] == "unknown_model"
    # The owner still sees everything.
    assert client.get(f"/v1/jobs/{job_id}", headers=a["headers"]).status_code == 200


def test_same_file_is_a_separate_object_per_tenant(client, new_tenant, onnx_bytes):
    a, b = new_tenant()["headers"], new_tenant()["headers"]
    ra = client.post("/v1/models", headers=a, files={"file": ("n.onnx", onnx_bytes)})
    rb = client.post("/v1/models", headers=b, files={"file": ("n.onnx", onnx_bytes)})
    assert ra.status_code == rb.status_code == 201
    assert ra.json()["id"] != rb.json()["id"]
    assert ra.json()["sha256"] == rb.json()["sha256"]
