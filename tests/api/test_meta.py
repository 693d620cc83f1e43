"""Methods, health, readiness, metrics, OpenAPI, and the SDK's retries against the app."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
import servicekit


def test_methods_lists_every_registered_method(client):
    from methods.registry import list_methods

    r = client.get("/v1/methods")
    assert r.status_code == 200
    body = r.json()
    assert body["count"] == len(list_methods())
    names = [m["name"] for m in body["data"]]
    assert names == sorted(m.name for m in list_methods())
    l1 = next(m for m in body["data"] if m["name"] == "l1_norm")
    assert "arXiv" in l1["paper"] and l1["summary"]
    assert l1["params_schema"]["properties"]["allocation"]["enum"] == ["uniform", "global"]


def test_healthz_and_readyz(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200
    assert r.json() == {
        "status": "ready",
        "checks": {"database": "ok", "broker": "ok", "storage": "ok"},
    }


def test_readyz_is_503_when_the_broker_is_down(make_client):
    c = make_client(broker_url=f"redis://127.0.0.1:{servicekit.free_port()}/0")
    r = c.get("/readyz")
    assert r.status_code == 503
    assert r.json()["status"] == "unavailable"
    assert r.json()["checks"]["database"] == "ok"
    assert r.json()["checks"]["broker"] != "ok"


def test_metrics_are_prometheus_text(client, tenant):
    client.get("/v1/jobs", headers=tenant["headers"])
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'prunery_http_requests_total{method="GET",route="/v1/jobs",status="200"}' in text
    assert 'prunery_jobs{status="queued"}' in text
    assert "prunery_http_request_duration_seconds_bucket" in text


def test_unknown_route_uses_the_error_shape(client):
    r = client.get("/v1/nothing-here")
    assert r.status_code == 404
    assert set(r.json()) == {"error", "detail"}


def test_openapi_documents_errors_and_operation_ids(client):
    spec = client.get("/openapi.json").json()
    assert "ErrorBody" in spec["components"]["schemas"]
    create = spec["paths"]["/v1/jobs"]["post"]
    assert create["operationId"] == "jobs-create_job"
    for status in ("400", "401", "409", "422", "429"):
        assert create["responses"][status]["content"]["application/json"]["schema"][
            "$ref"
        ].endswith("/ErrorBody")
    upload = spec["paths"]["/v1/models"]["post"]
    assert {"413", "415"} <= set(upload["responses"])
    assert "multipart/form-data" in upload["requestBody"]["content"]
    assert client.get("/docs").status_code == 200


def test_api_imports_neither_torch_nor_the_engine():
    code = (
        "import sys\n"
        "from app.main import create_app\n"
        "from core.settings import Settings\n"
        "import app.features.jobs.router, app.features.models.router, app.features.datasets.router, app.admin, worker.tasks\n"
        "create_app(Settings(database_url='sqlite://', broker_url='memory://'))\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.split('.')[0] in ('engine', 'onnxruntime'))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=servicekit.REPO
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_sdk_imports_only_httpx_and_pydantic():
    code = (
        "import sys\n"
        "import prunery, prunery.client, prunery.cli, prunery.errors\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('app', 'core', 'worker', 'engine', 'methods', 'torch', 'fastapi', 'sqlalchemy', 'celery', 'onnx', 'numpy'))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=servicekit.REPO
    )
    assert r.returncode == 0, r.stdout + r.stderr


class _Flaky(httpx.BaseTransport):
    """Answers with the given statuses first, then hands over to the real app."""

    def __init__(self, inner: httpx.BaseTransport, statuses: list[int]) -> None:
        self.inner, self.statuses, self.calls = inner, list(statuses), []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.calls.append((request.method, request.url.path))
        if self.statuses:
            status = self.statuses.pop(0)
            return httpx.Response(
                status, json={"error": "busy", "detail": "try later"}, headers={"Retry-After": "0"}
            )
        return self.inner.handle_request(request)


def test_sdk_retries_idempotent_calls_on_429_503_504(client, uploaded):
    from prunery import Client

    flaky = _Flaky(client._transport, [429, 503, 504])
    sdk = Client("http://testserver", uploaded["key"], transport=flaky, backoff=0.01)
    spec = {
        "model_id": uploaded["model_id"],
        "dataset_id": uploaded["dataset_id"],
        "method": {"name": "l1_norm"},
        "target": {"flops": 0.5},
    }
    job = sdk.jobs.create(spec)  # sent with an Idempotency-Key, so it may be retried
    assert job.status == "queued"
    assert [c for c in flaky.calls if c[0] == "POST"] == [("POST", "/v1/jobs")] * 4
    assert sdk.jobs.list().count == 1
    flaky.statuses = [503]
    assert sdk.jobs.get(job.id).id == job.id


def test_sdk_raises_typed_errors(client, uploaded):
    from prunery import Client
    from prunery import errors as e

    sdk = Client("http://testserver", uploaded["key"], transport=client._transport, max_retries=0)
    with pytest.raises(e.NotFound) as nf:
        sdk.jobs.get("job_missing")
    assert nf.value.status == 404 and nf.value.code == "not_found"
    with pytest.raises(e.ValidationError) as ve:
        sdk.jobs.create(
            {
                "model_id": uploaded["model_id"],
                "dataset_id": uploaded["dataset_id"],
                "method": {"name": "nope"},
                "target": {"flops": 0.5},
            }
        )
    assert ve.value.code == "bad_spec"
    with pytest.raises(e.Unauthorized):
        Client("http://testserver", "pk_bad", transport=client._transport).jobs.list()
    sdk429 = Client(
        "http://testserver",
        uploaded["key"],
        transport=_Flaky(client._transport, [429] * 5),
        max_retries=2,
        backoff=0.01,
    )
    with pytest.raises(e.RateLimited):
        sdk429.jobs.list()


def test_database_down_is_503_with_retry_after(make_client):
    port = servicekit.free_port()
    c = make_client(database_url=f"postgresql+psycopg://postgres@127.0.0.1:{port}/test")
    r = c.get("/v1/jobs", headers={"Authorization": "Bearer pk_x_y"})
    assert r.status_code == 503
    assert r.json()["error"] == "database_unavailable"
    assert r.headers["retry-after"] == "5"
    ready = c.get("/readyz")
    assert ready.status_code == 503 and ready.json()["checks"]["database"] != "ok"


def test_async_client_against_the_app(client, uploaded, tmp_path):
    import asyncio

    from prunery import AsyncClient
    from prunery import errors as e

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=client.app)
        async with AsyncClient("http://testserver", uploaded["key"], transport=transport) as sdk:
            model = await sdk.models.get(uploaded["model_id"])
            assert model.id == uploaded["model_id"]
            job = await sdk.jobs.create(
                {
                    "model_id": model.id,
                    "dataset_id": uploaded["dataset_id"],
                    "method": {"name": "l1_norm"},
                    "target": {"flops": 0.5},
                }
            )
            assert job.status == "queued"
            await job.cancel()
            with pytest.raises(e.JobCancelled):
                await job.wait(poll_interval=0.01, timeout=10)
            page = await sdk.jobs.list(status="cancelled")
            assert [j.id for j in page.data] == [job.id]
            with pytest.raises(e.Conflict):
                await job.report()
            with pytest.raises(e.NotFound):
                await sdk.jobs.get("job_nope")

    asyncio.run(scenario())
