"""Typed dependencies: routes read like plain functions of (db, tenant, settings, ...)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated

from celery import Celery
from fastapi import Depends, Header, Request
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.errors import TooManyRequests, Unauthorized
from app.models import utcnow
from app.security import lookup_key
from app.storage import Storage


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_sessionmaker(request: Request) -> sessionmaker[Session]:
    return request.app.state.sessionmaker


def after_commit(session: Session, callback: Callable[[], None]) -> None:
    """Run `callback` once the request's transaction has committed (e.g. enqueue a job):
    a worker must never see a job id whose row is not yet visible."""
    session.info.setdefault("after_commit", []).append(callback)


def get_db(request: Request) -> Iterator[Session]:
    """One session per request, committed at the edge (or rolled back on error)."""
    session = request.app.state.sessionmaker()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
    for callback in session.info.pop("after_commit", []):
        callback()


def get_storage(request: Request) -> Storage:
    return request.app.state.storage


def get_celery(request: Request) -> Celery:
    return request.app.state.celery


SettingsDep = Annotated[Settings, Depends(get_settings)]
# scope="function": the session is committed before the response is sent, so a client that
# gets 201/202 can immediately read what it created.
SessionDep = Annotated[Session, Depends(get_db, scope="function")]
SessionFactoryDep = Annotated[sessionmaker[Session], Depends(get_sessionmaker)]
StorageDep = Annotated[Storage, Depends(get_storage)]
CeleryDep = Annotated[Celery, Depends(get_celery)]


@dataclass(frozen=True)
class Principal:
    tenant_id: str
    key_id: str


class RateLimiter:
    """Token bucket per API key, in process memory (per API replica)."""

    def __init__(self, per_minute: int) -> None:
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, per_minute / 6.0)  # bursts of 10 s worth
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """0 when allowed, else seconds until a token is available."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate


def current_principal(
    request: Request,
    db: SessionDep,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Principal:
    if not authorization:
        raise Unauthorized("send your API key as 'Authorization: Bearer <key>'")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("the Authorization header must be 'Bearer <key>'")
    key = lookup_key(db, token.strip())
    if key is None:
        raise Unauthorized("unknown or revoked API key", code="invalid_api_key")
    wait = request.app.state.rate_limiter.take(key.id)
    if wait > 0:
        raise TooManyRequests(
            "rate limit exceeded for this API key; slow down",
            headers={"Retry-After": str(max(1, int(wait + 0.999)))},
        )
    now = utcnow()
    # Touch last_used_at at most once a minute: reads must not all become writes.
    if key.last_used_at is None or now - key.last_used_at > timedelta(minutes=1):
        key.last_used_at = now
    return Principal(tenant_id=key.tenant_id, key_id=key.id)


PrincipalDep = Annotated[Principal, Depends(current_principal)]
