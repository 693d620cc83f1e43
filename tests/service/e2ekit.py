"""Helpers of the service tests (a uniquely named module: `conftest` names clash across dirs)."""

from __future__ import annotations

REDIS_DB = 15
SCHEMA = "prunery_service_test"


def spec(uploaded: dict, **extra) -> dict:  # type: ignore[no-untyped-def, type-arg]
    body = {
        "model_id": uploaded["model"].id,
        "dataset_id": uploaded["data"].id,
        "method": {"name": "l1_norm"},
        "target": {"flops": 0.5},
        "recovery": {"epochs": 1, "batch_size": 64},
    }
    body.update(extra)
    return body


def wait_for(predicate, timeout: float = 300.0, interval: float = 0.2):  # type: ignore[no-untyped-def]
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")
