"""Unauthenticated operations endpoints: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from app.errors import error_responses
from app.features.health import service
from app.features.health.schemas import Health, Readiness

router = APIRouter()


@router.get("/healthz", response_model=Health, tags=["health"], summary="The process is up")
def healthz() -> Health:
    return Health()


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
    checks = await service.readiness(request.app.state)
    ok = all(v == "ok" for v in checks.values())
    body = Readiness(status="ready" if ok else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


@router.get(
    "/metrics",
    tags=["health"],
    summary="Prometheus metrics (PRUNERY_METRICS_TOKEN as a bearer token when set)",
    responses=error_responses(401, 404, 503),
)
def metrics(request: Request) -> Response:
    body = service.scrape(request.app.state, request.headers.get("authorization", ""))
    return Response(body, media_type=CONTENT_TYPE_LATEST)
