"""Prometheus metrics, in a registry of our own (served at /metrics)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Receive, Scope, Send

REGISTRY = CollectorRegistry(auto_describe=True)

HTTP_REQUESTS = Counter(
    "prunery_http_requests_total",
    "HTTP requests by method, route template and status.",
    ["method", "route", "status"],
    registry=REGISTRY,
)
HTTP_LATENCY = Histogram(
    "prunery_http_request_duration_seconds",
    "HTTP request latency by route template.",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)
UPLOAD_BYTES = Counter(
    "prunery_upload_bytes_total", "Bytes received in uploads.", ["kind"], registry=REGISTRY
)
JOBS_SUBMITTED = Counter(
    "prunery_jobs_submitted_total", "Jobs accepted by POST /v1/jobs.", registry=REGISTRY
)
JOBS_BY_STATUS = Gauge(
    "prunery_jobs",
    "Jobs in the database by status (all tenants), read at scrape time.",
    ["status"],
    registry=REGISTRY,
)


# Label values come only from these sets: anyone can send any method token or path, and each
# new label value would be a new series kept forever.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _status_label(code: int) -> str:
    return str(code) if 100 <= code <= 599 else "other"


class MetricsMiddleware:
    """Pure ASGI middleware (no BaseHTTPMiddleware: it would buffer streaming responses)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def _send(message):  # type: ignore[no-untyped-def]
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, _send)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            method = method if method in _METHODS else "other"
            HTTP_REQUESTS.labels(method, template, _status_label(status["code"])).inc()
            HTTP_LATENCY.labels(method, template).observe(time.perf_counter() - start)
