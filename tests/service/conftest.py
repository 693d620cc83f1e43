"""Service tier: a real uvicorn API process, a real Celery worker process (prefork pool,
embedded beat running the reaper), the real Postgres and Redis, and the real engine.
Heartbeat and reaper intervals are shortened through settings so crash recovery is quick."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import servicekit  # noqa: E402
from e2ekit import REDIS_DB, SCHEMA  # noqa: E402


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    servicekit.require_services(REDIS_DB)
    from app.security import create_api_key, create_tenant
    from core.db import make_engine, make_sessionmaker, migrate, transaction
    from core.settings import Settings

    root = tmp_path_factory.mktemp("service")
    settings = Settings(
        environment="test",
        # application_name: pg_stat_activity tells the stack's connections from others'
        database_url=servicekit.fresh_schema(SCHEMA) + f"&application_name={SCHEMA}",
        broker_url=servicekit.redis_url(REDIS_DB),
        storage_dir=root / "artifacts",
        worker_cache_dir=root / "worker-cache",
        broker_folder=root / "broker",
        job_queue="gpu-service-test",
        control_queue="control-service-test",
        heartbeat_interval_s=1.0,
        heartbeat_timeout_s=10.0,
        reaper_interval_s=1.0,
        requeue_queued_after_s=8.0,
        max_attempts=2,
        progress_min_interval_s=0.2,
        events_poll_interval_s=0.2,
        upload_idle_timeout_s=3.0,
        cancel_grace_s=3.0,
    )
    servicekit.flush_redis(REDIS_DB)
    migrate(settings)
    engine = make_engine(settings)
    with transaction(make_sessionmaker(engine)) as s:
        tenant = create_tenant(s, "service-tests")
        _row, key = create_api_key(s, tenant, "tests")
    engine.dispose()

    # Webhooks: the tests' receivers listen on 127.0.0.1 (explicitly allowed here, as in
    # development), and retries come quickly.
    webhook_env = {
        "PRUNERY_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8",
        "PRUNERY_WEBHOOK_BACKOFF_S": "0.5",
        "PRUNERY_WEBHOOK_SWEEP_INTERVAL_S": "1.0",
    }
    st = servicekit.Stack({**servicekit.settings_env(settings), **webhook_env}, root)
    st.settings = settings
    st.api_key = key
    try:
        st.start_api()
        st.start_worker()
        yield st
    finally:
        st.stop()
        print(st.logs())


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict:  # type: ignore[type-arg]
    """A CNN trained on scikit-learn's bundled digits, as ONNX, and the data as .npz."""
    root = tmp_path_factory.mktemp("digits")
    arrays = servicekit.digits_arrays()
    np.savez(root / "digits.npz", **arrays)
    accuracy = servicekit.train_digits_onnx(root / "digits.onnx", arrays)
    assert accuracy > 0.9, accuracy
    return {
        "model": root / "digits.onnx",
        "data": root / "digits.npz",
        "arrays": arrays,
        "accuracy": accuracy,
    }


@pytest.fixture()
def sdk(stack):  # type: ignore[no-untyped-def]
    from prunery import Client

    with Client(stack.url, stack.api_key) as client:
        yield client


@pytest.fixture()
def uploaded(sdk, digits) -> dict:  # type: ignore[type-arg]
    return {
        "model": sdk.models.upload(digits["model"]),
        "data": sdk.datasets.upload(digits["data"]),
    }
