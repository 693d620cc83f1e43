"""Helpers of the API tests (a uniquely named module: `conftest` names clash across dirs)."""

from __future__ import annotations

import numpy as np

REDIS_DB = 14
SCHEMA = "prunery_api_test"


def npz_bytes(
    n_train: int = 40, n_test: int = 10, shape: tuple[int, ...] = (1, 8, 8), seed: int = 0
) -> bytes:
    import io

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    np.savez(
        buf,
        x_train=rng.random((n_train, *shape), dtype=np.float32),
        y_train=rng.integers(0, 10, n_train),
        x_test=rng.random((n_test, *shape), dtype=np.float32),
        y_test=rng.integers(0, 10, n_test),
    )
    return buf.getvalue()


def job_spec(model_id: str, dataset_id: str, **extra) -> dict:  # type: ignore[no-untyped-def, type-arg]
    spec = {
        "model_id": model_id,
        "dataset_id": dataset_id,
        "method": {"name": "l1_norm", "params": {}},
        "target": {"flops": 0.5},
        "recovery": {"epochs": 1},
    }
    spec.update(extra)
    return spec
