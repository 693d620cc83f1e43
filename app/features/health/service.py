"""Readiness probes (database, broker, storage; cached per process) and the metrics scrape."""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Callable
from typing import Any

from fastapi.concurrency import run_in_threadpool
from prometheus_client import generate_latest
from sqlalchemy import func, select, text
from starlette.datastructures import State

from app.errors import NotFound, Unauthorized
from app.metrics import JOBS_BY_STATUS, REGISTRY
from core.orm import Job
from prunery.types import JOB_STATUSES

log = logging.getLogger("prunery.api")

READY_TTL_S = 5.0


def _check_db(state: State) -> None:
    with state.sessionmaker() as session:
        session.execute(text("SELECT 1"))


def _check_broker(state: State) -> None:
    conn = state.celery.connection_for_write()
    try:
        conn.ensure_connection(max_retries=1, timeout=2)
    finally:
        conn.release()


def _check_storage(state: State) -> None:
    state.storage.check()


CHECKS: tuple[tuple[str, Callable[[State], None]], ...] = (
    ("database", _check_db),
    ("broker", _check_broker),
    ("storage", _check_storage),
)


async def _probe(state: State) -> dict[str, str]:
    checks: dict[str, str] = {}
    for name, fn in CHECKS:
        try:
            await asyncio.wait_for(run_in_threadpool(fn, state), timeout=5)
            checks[name] = "ok"
        except Exception as exc:  # report every failing dependency, not just the first
            log.warning("readiness: %s unavailable: %s: %s", name, type(exc).__name__, exc)
            checks[name] = "unavailable"
    return checks


async def readiness(state: State) -> dict[str, str]:
    """The checks' answers, probed at most once every READY_TTL_S per process."""
    now = asyncio.get_running_loop().time()
    cached: Any = getattr(state, "readiness", None)
    if cached is None or now - cached[0] > READY_TTL_S:
        lock = state.__dict__.setdefault("_readiness_lock", asyncio.Lock())
        async with lock:
            cached = getattr(state, "readiness", None)
            if cached is None or now - cached[0] > READY_TTL_S:
                cached = (now, await _probe(state))
                state.readiness = cached
    checks: dict[str, str] = cached[1]
    return checks


def scrape(state: State, authorization: str) -> bytes:
    """The Prometheus exposition, after the metrics token check (404 when not served)."""
    settings = state.settings
    token = settings.metrics_token
    if not settings.metrics_enabled or (settings.environment == "production" and not token):
        raise NotFound("metrics are not served here (set PRUNERY_METRICS_TOKEN)")
    if token and not hmac.compare_digest(authorization.encode(), f"Bearer {token}".encode()):
        raise Unauthorized("send the metrics token as 'Authorization: Bearer <token>'")
    with state.sessionmaker() as session:
        counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
    for status in JOB_STATUSES:
        JOBS_BY_STATUS.labels(status).set(counts.get(status, 0))
    out: bytes = generate_latest(REGISTRY)
    return out
