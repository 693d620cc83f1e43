"""Abuse control for the API: rate limits shared by every API process (Redis, through the
`limits` library), per-tenant caps on concurrent uploads and event streams, and the client
address used to limit requests that carry no valid key.

Rate limits fail open: when Redis is unreachable a request is let through (and logged)
rather than answered 500/503 — the broker outage is reported by /readyz.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from limits import RateLimitItem, RateLimitItemPerHour, RateLimitItemPerMinute
from limits.storage import storage_from_string
from limits.strategies import FixedWindowRateLimiter
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import BadRequest, TooManyRequests
from core.settings import Settings

log = logging.getLogger("prunery.api")


def _storage_url(settings: Settings) -> str:
    if settings.rate_limit_storage_url:
        return settings.rate_limit_storage_url
    if settings.broker_url.startswith(("redis://", "rediss://")):
        return settings.broker_url
    return "memory://"


class RateLimits:
    """Fixed-window counters keyed by (what, who), in Redis when the deployment has one."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        url = _storage_url(settings)
        options = (
            {"socket_timeout": 0.5, "socket_connect_timeout": 0.5}
            if url.startswith("redis")
            else {}
        )
        self.storage = storage_from_string(url, **options)
        self.limiter = FixedWindowRateLimiter(self.storage)
        self.namespace = f"prunery:{settings.job_queue}"

    def _hit(self, item: RateLimitItem, *ident: str) -> float:
        """0 when allowed, else seconds until the window resets."""
        try:
            if self.limiter.hit(item, self.namespace, *ident):
                return 0.0
            reset = self.limiter.get_window_stats(item, self.namespace, *ident).reset_time
            return max(1.0, reset - time.time())
        except Exception as exc:  # Redis down: fail open, say so in the log
            log.warning("rate limiter unavailable (%s); request allowed", type(exc).__name__)
            return 0.0

    def _raise(self, wait: float, detail: str, code: str = "rate_limited") -> None:
        if wait > 0:
            raise TooManyRequests(
                detail, code=code, headers={"Retry-After": str(int(wait + 0.999))}
            )

    def check_key(self, key_id: str) -> None:
        n = self.settings.rate_limit_per_minute
        if n > 0:
            self._raise(
                self._hit(RateLimitItemPerMinute(n), "key", key_id),
                f"rate limit of {n} requests per minute exceeded for this API key; slow down",
            )

    def check_failed_auth(self, address: str) -> None:
        """Count a request with a missing/unknown key; 429 once the address is over its limit."""
        n = self.settings.failed_auth_per_minute
        if n > 0:
            self._raise(
                self._hit(RateLimitItemPerMinute(n), "badauth", address),
                f"too many requests with a missing or invalid API key from {address}; "
                "check the key and retry later",
                code="auth_rate_limited",
            )

    def check_upload(self, tenant_id: str) -> None:
        n = self.settings.uploads_per_hour_per_tenant
        if n > 0:
            self._raise(
                self._hit(RateLimitItemPerHour(n), "uploads", tenant_id),
                f"upload quota of {n} uploads per hour reached; retry after Retry-After seconds",
                code="upload_quota",
            )


def client_address(request: Request) -> str:
    """The peer address (uvicorn applies X-Forwarded-For only from --forwarded-allow-ips)."""
    return request.client.host if request.client else "unknown"


class ConcurrencyCaps:
    """Concurrent uploads and event streams per tenant, in this API process.

    These guard the process's own resources (sockets, staging files, threadpool slots), so a
    per-process count is the right unit; run N API processes and a tenant gets N times it.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.active: Counter[tuple[str, str]] = Counter()

    @asynccontextmanager
    async def hold(self, kind: str, tenant_id: str) -> AsyncIterator[None]:
        lease = self.acquire(kind, tenant_id)
        try:
            yield
        finally:
            lease.release()

    def acquire(self, kind: str, tenant_id: str) -> _Lease:
        """Take one slot (429 past the cap); release it with `.release()`."""
        limit = {
            "upload": self.settings.max_concurrent_uploads_per_tenant,
            "stream": self.settings.max_concurrent_streams_per_tenant,
        }[kind]
        key = (kind, tenant_id)
        if limit > 0 and self.active[key] >= limit:
            what = "uploads" if kind == "upload" else "event streams"
            raise TooManyRequests(
                f"you already have {self.active[key]} {what} open (limit {limit}); "
                "finish or close one first",
                code=f"too_many_{'uploads' if kind == 'upload' else 'streams'}",
                headers={"Retry-After": "5"},
            )
        self.active[key] += 1
        return _Lease(self, key)


class _Lease:
    def __init__(self, caps: ConcurrencyCaps, key: tuple[str, str]) -> None:
        self.caps, self.key, self.released = caps, key, False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.caps.active[self.key] -= 1
            if self.caps.active[self.key] <= 0:
                del self.caps.active[self.key]


class BodyGuard:
    """Pure ASGI middleware bounding request bodies that are not multipart uploads (those are
    streamed to disk by `app.features.files.multipart` with their own limits): at most `max_bytes` (413), and
    no pause longer than `idle_s` while the body arrives (408) — a stalled JSON client is cut
    off instead of holding a worker thread forever."""

    def __init__(self, app: ASGIApp, max_bytes: int = 1024 * 1024, idle_s: float = 30.0) -> None:
        self.app, self.max_bytes, self.idle_s = app, max_bytes, idle_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if headers.get(b"content-type", b"").lower().startswith(b"multipart/"):
            await self.app(scope, receive, send)
            return
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            response = JSONResponse(
                {
                    "error": "payload_too_large",
                    "detail": f"the request body is {int(declared)} bytes; the limit is {self.max_bytes}",
                },
                status_code=413,
                headers={"Connection": "close"},
            )
            await response(scope, receive, send)
            return
        state = {"done": False, "seen": 0}

        async def guarded() -> Message:
            if state["done"]:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.idle_s or None)
            except TimeoutError:
                raise HTTPException(
                    408, f"the client sent nothing for {self.idle_s:.0f} s; request cut off"
                ) from None
            if message["type"] == "http.request":
                state["seen"] += len(message.get("body", b""))
                if state["seen"] > self.max_bytes:
                    raise HTTPException(413, f"the request body is over {self.max_bytes} bytes")
                if not message.get("more_body", False):
                    state["done"] = True
            else:
                state["done"] = True
            return message

        await self.app(scope, guarded, send)


MAX_EVENT_ID = 2**63 - 1  # job_events.id is a Postgres bigint


def plausible_id(ident: str) -> bool:
    """Whether a path id could name a row: short, printable ASCII (NUL is refused by Postgres
    and would otherwise surface as a 500)."""
    return 0 < len(ident) <= 64 and ident.isascii() and ident.isprintable()


def parse_last_event_id(value: str | None) -> int | None:
    """The SSE `Last-Event-ID` header: an ASCII decimal event id, else a clear 400."""
    if value is None or value == "":
        return None
    value = value.strip()
    if not (value.isascii() and value.isdigit() and len(value) <= 19) or int(value) > MAX_EVENT_ID:
        raise BadRequest(
            f"Last-Event-ID must be an event id (decimal digits up to {MAX_EVENT_ID}); "
            "send back the id of the last event you received"
        )
    return int(value)
