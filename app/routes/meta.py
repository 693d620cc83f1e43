"""Unauthenticated endpoints: method catalog, health, readiness, metrics."""

from __future__ import annotations

import asyncio
import hmac
import logging

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import func, select, text

from app.errors import NotFound, Unauthorized, error_responses
from app.metrics import JOBS_BY_STATUS, REGISTRY
from app.models import Job
from app.schemas import Health, MethodPublic, MethodsPublic, Readiness
from workers.methods.catalog import list_methods

router = APIRouter()
log = logging.getLogger("prunery.api")

STATUSES = ("queued", "running", "cancelling", "succeeded", "failed", "cancelled")


@router.get("/v1/methods", response_model=MethodsPublic, tags=["methods"])
def get_methods() -> MethodsPublic:
    data = [MethodPublic(**m.describe()) for m in list_methods()]
    return MethodsPublic(data=data, count=len(data))


@router.get("/healthz", response_model=Health, tags=["health"], summary="The process is up")
def healthz() -> Health:
    return Health()


def _check_db(request: Request) -> None:
    with request.app.state.sessionmaker() as session:
        session.execute(text("SELECT 1"))


def _check_broker(request: Request) -> None:
    conn = request.app.state.celery.connection_for_write()
    try:
        conn.ensure_connection(max_retries=1, timeout=2)
    finally:
        conn.release()


def _check_storage(request: Request) -> None:
    request.app.state.storage.check()


_READY_TTL_S = 5.0


@router.get(
    "/readyz",
    response_model=Readiness,
    tags=["health"],
    summary="Database, broker and artifact storage reachable",
    description="Checked at most once every 5 s per API process (the answer is cached), so "
    "polling it costs the dependencies nothing; a failing check says only 'unavailable' "
    "(the reason is in the API's log).",
    responses={503: {"model": Readiness, "description": "A dependency is down"}},
)
async def readyz(request: Request) -> JSONResponse:
    state = request.app.state
    now = asyncio.get_running_loop().time()
    cached = getattr(state, "readiness", None)
    if cached is None or now - cached[0] > _READY_TTL_S:
        lock = state.__dict__.setdefault("_readiness_lock", asyncio.Lock())
        async with lock:
            cached = getattr(state, "readiness", None)
            if cached is None or now - cached[0] > _READY_TTL_S:
                cached = (now, await _probe(request))
                state.readiness = cached
    checks = cached[1]
    ok = all(v == "ok" for v in checks.values())
    body = Readiness(status="ready" if ok else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


async def _probe(request: Request) -> dict[str, str]:
    checks: dict[str, str] = {}
    for name, fn in (
        ("database", _check_db),
        ("broker", _check_broker),
        ("storage", _check_storage),
    ):
        try:
            await asyncio.wait_for(run_in_threadpool(fn, request), timeout=5)
            checks[name] = "ok"
        except Exception as exc:  # report every failing dependency, not just the first
            log.warning("readiness: %s unavailable: %s: %s", name, type(exc).__name__, exc)
            checks[name] = "unavailable"
    return checks


@router.get(
    "/metrics",
    tags=["health"],
    summary="Prometheus metrics (PRUNERY_METRICS_TOKEN as a bearer token when set)",
    responses=error_responses(401, 404, 503),
)
def metrics(request: Request) -> Response:
    settings = request.app.state.settings
    token = settings.metrics_token
    if not settings.metrics_enabled or (settings.environment == "production" and not token):
        raise NotFound("metrics are not served here (set PRUNERY_METRICS_TOKEN)")
    if token:
        sent = request.headers.get("authorization", "")
        if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
            raise Unauthorized("send the metrics token as 'Authorization: Bearer <token>'")
    with request.app.state.sessionmaker() as session:
        counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
    for status in STATUSES:
        JOBS_BY_STATUS.labels(status).set(counts.get(status, 0))
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
