"""API tier: the FastAPI app in-process (TestClient) against the real Postgres (schema built
by the Alembic migrations) and the real Redis broker. No worker is needed here: submitted
jobs are published to Redis and the tests look at the queue itself."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))

import servicekit  # noqa: E402
from apikit import REDIS_DB, SCHEMA, npz_bytes  # noqa: E402


@pytest.fixture(scope="session")
def base_settings(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    servicekit.require_services(REDIS_DB)
    from core.db import migrate
    from core.settings import Settings

    url = servicekit.fresh_schema(SCHEMA)
    servicekit.flush_redis(REDIS_DB)
    root = tmp_path_factory.mktemp("api")
    settings = Settings(
        environment="test",
        database_url=url,
        broker_url=servicekit.redis_url(REDIS_DB),
        storage_dir=root / "artifacts",
        worker_cache_dir=root / "cache",
        job_queue="gpu-api-test",
        control_queue="control-api-test",
    )
    migrate(settings)
    return settings


@pytest.fixture(scope="session")
def make_client(base_settings):  # type: ignore[no-untyped-def]
    """Build a TestClient for the app with some settings overridden."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    clients = []

    def _make(**overrides):  # type: ignore[no-untyped-def]
        settings = base_settings.model_copy(update=overrides)
        client = TestClient(create_app(settings))
        client.__enter__()
        clients.append(client)
        return client

    yield _make
    for c in clients:
        c.__exit__(None, None, None)


@pytest.fixture(scope="session")
def client(make_client):  # type: ignore[no-untyped-def]
    return make_client()


@pytest.fixture(scope="session")
def new_tenant(client) -> Callable[[], dict[str, str]]:  # type: ignore[no-untyped-def]
    """Create a tenant with an API key; returns {'tenant_id', 'key', 'key_id', 'headers'}."""
    from app.security import create_api_key, create_tenant
    from core.db import transaction

    factory = client.app.state.sessionmaker

    def _new() -> dict:  # type: ignore[type-arg]
        with transaction(factory) as s:
            tenant = create_tenant(s, f"tenant-{uuid.uuid4().hex[:10]}")
            row, key = create_api_key(s, tenant, "test")
            out = {"tenant_id": tenant.id, "key": key, "key_id": row.id}
        out["headers"] = {"Authorization": f"Bearer {key}"}  # type: ignore[assignment]
        return out

    return _new


@pytest.fixture()
def tenant(new_tenant):  # type: ignore[no-untyped-def]
    return new_tenant()


@pytest.fixture(scope="session")
def onnx_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A small conv net for 1x8x8 inputs (untrained: the API only inspects it)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10)
    )
    path = tmp_path_factory.mktemp("onnx") / "net.onnx"
    torch.onnx.export(
        model,
        torch.zeros(1, 1, 8, 8),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["x"],
        dynamic_axes={"x": {0: "batch"}},
    )
    return path.read_bytes()


@pytest.fixture()
def uploaded(client, tenant, onnx_bytes) -> Iterator[dict[str, str]]:  # type: ignore[no-untyped-def]
    """A tenant with one model and one dataset uploaded."""
    h = tenant["headers"]
    m = client.post("/v1/models", headers=h, files={"file": ("net.onnx", onnx_bytes)})
    d = client.post("/v1/datasets", headers=h, files={"file": ("data.npz", npz_bytes())})
    assert m.status_code == 201, m.text
    assert d.status_code == 201, d.text
    yield {**tenant, "model_id": m.json()["id"], "dataset_id": d.json()["id"]}
