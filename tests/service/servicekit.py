"""Shared by tests/api and tests/service: the real Postgres and Redis, schemas built by the
Alembic migrations, a digits-trained ONNX model, and a running API + Celery worker.

Postgres: PRUNERY_TEST_DATABASE_URL (default postgresql+psycopg://postgres@127.0.0.1:5432/test)
Redis:    PRUNERY_TEST_REDIS_URL   (default redis://127.0.0.1:6379/<db>)
With CI=true an unreachable service FAILS the tier; elsewhere the tier is skipped.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
PG_URL = os.environ.get(
    "PRUNERY_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_BASE = os.environ.get("PRUNERY_TEST_REDIS_URL", "redis://127.0.0.1:6379")


def redis_url(db: int) -> str:
    base = REDIS_BASE.rstrip("/")
    if base.count("/") > 2:  # already names a database
        return base
    return f"{base}/{db}"


def require_services(redis_db: int) -> None:
    """Fail in CI, skip elsewhere, when Postgres or Redis is unreachable."""
    import psycopg
    import redis

    problems = []
    try:
        psycopg.connect(
            PG_URL.replace("postgresql+psycopg", "postgresql"), connect_timeout=3
        ).close()
    except Exception as exc:
        problems.append(f"Postgres at {PG_URL}: {exc}")
    try:
        redis.Redis.from_url(redis_url(redis_db), socket_connect_timeout=3).ping()
    except Exception as exc:
        problems.append(f"Redis at {redis_url(redis_db)}: {exc}")
    if problems:
        message = "service tier needs real Postgres and Redis: " + "; ".join(problems)
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


def fresh_schema(schema: str) -> str:
    """Drop and recreate a Postgres schema; return a URL whose search_path is that schema."""
    import psycopg

    with psycopg.connect(
        PG_URL.replace("postgresql+psycopg", "postgresql"), autocommit=True
    ) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        conn.execute(f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in PG_URL else "?"
    return f"{PG_URL}{sep}options=-csearch_path%3D{schema}"


def flush_redis(db: int) -> None:
    import redis

    redis.Redis.from_url(redis_url(db)).flushdb()


def settings_env(settings: Any) -> dict[str, str]:
    """PRUNERY_* variables reproducing `settings` in a subprocess."""
    env = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        env[f"PRUNERY_{name.upper()}"] = str(value)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ digits model and data


def digits_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    n_test = 360
    return {
        "x_train": x[n_test:],
        "y_train": y[n_test:],
        "x_test": x[:n_test],
        "y_test": y[:n_test],
    }


def train_digits_onnx(
    path: Path, arrays: dict[str, np.ndarray], epochs: int = 10, width: int = 16
) -> float:
    """A small CNN trained on digits, exported to ONNX (dynamic batch). Returns test accuracy."""
    import torch
    from torch import nn

    # One thread: this net is tiny, and on a busy 2-core machine more threads only contend.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, 10),
    )
    x, y = torch.from_numpy(arrays["x_train"]), torch.from_numpy(arrays["y_train"])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (
            model(torch.from_numpy(arrays["x_test"])).argmax(1).numpy() == arrays["y_test"]
        ).mean()
    torch.set_num_threads(threads)
    torch.onnx.export(
        model,
        torch.zeros(1, 1, 8, 8),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
    )
    return float(acc)


# ------------------------------------------------------------------ processes


class Stack:
    """A real uvicorn API process and a real Celery worker process (with embedded beat)."""

    def __init__(self, env: dict[str, str], workdir: Path) -> None:
        self.env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self._worker_count = 0

    def _log(self, name: str) -> Any:
        return open(self.workdir / f"{name}.log", "ab")

    def start_api(self) -> None:
        self.api = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "app.main:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "warning",
            ],
            cwd=REPO,
            env=self.env,
            stdout=self._log("api"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.wait_ready()

    def wait_ready(self, timeout: float = 60.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.api is not None and self.api.poll() is not None:
                raise RuntimeError(
                    f"the API exited: {(self.workdir / 'api.log').read_text()[-3000:]}"
                )
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError("the API did not become ready")

    def start_worker(self) -> subprocess.Popen[bytes]:
        self._worker_count += 1
        self.worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "worker.celery_app",
                "worker",
                "-Q",
                f"{self.env['PRUNERY_JOB_QUEUE']},{self.env['PRUNERY_CONTROL_QUEUE']}",
                "-c",
                "1",
                "-B",
                "-s",
                str(self.workdir / f"beat-{self._worker_count}"),
                "-n",
                f"test{self._worker_count}@%h",
                "--loglevel",
                "INFO",
            ],
            cwd=REPO,
            env=self.env,
            stdout=self._log("worker"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self.worker

    def kill_worker(self, sig: int = signal.SIGKILL) -> None:
        """Signal the worker's whole process group (main process, pool child, beat)."""
        if self.worker is None or self.worker.poll() is not None:
            return
        try:
            os.killpg(self.worker.pid, sig)
            self.worker.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.worker.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.worker.wait(timeout=10)

    def stop(self) -> None:
        self.kill_worker(signal.SIGTERM)
        if self.api is not None and self.api.poll() is None:
            os.killpg(self.api.pid, signal.SIGTERM)
            try:
                self.api.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.api.pid, signal.SIGKILL)

    def logs(self) -> str:
        out = []
        for name in ("api", "worker"):
            path = self.workdir / f"{name}.log"
            if path.exists():
                out.append(f"--- {name}.log (tail)\n{path.read_text(errors='replace')[-4000:]}")
        return "\n".join(out)
