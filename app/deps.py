"""Typed dependencies: routes read like plain functions of (db, tenant, settings, ...)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated

from celery import Celery
from fastapi import Depends, Header, Request
from sqlalchemy.orm import Session, sessionmaker

from app.abuse import RateLimits, client_address
from app.errors import Unauthorized
from app.security import lookup_key
from core.db import transaction
from core.orm import utcnow
from core.settings import Settings
from core.storage import Storage


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_sessionmaker(request: Request) -> sessionmaker[Session]:
    factory: sessionmaker[Session] = request.app.state.sessionmaker
    return factory


def after_commit(session: Session, callback: Callable[[], None]) -> None:
    """Run `callback` once the request's transaction has committed (e.g. enqueue a job):
    a worker must never see a job id whose row is not yet visible."""
    session.info.setdefault("after_commit", []).append(callback)


def get_db(request: Request) -> Iterator[Session]:
    """One session per request, committed at the edge (or rolled back on error)."""
    with transaction(request.app.state.sessionmaker) as session:
        yield session
    for callback in session.info.pop("after_commit", []):
        callback()


def get_storage(request: Request) -> Storage:
    storage: Storage = request.app.state.storage
    return storage


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


def current_principal(
    request: Request,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Principal:
    """Authenticate in a short transaction of its own: the connection goes back to the pool
    before the route runs, so a slow upload or a long event stream holds none."""
    limits: RateLimits = request.app.state.rate_limits
    token = ""
    if authorization:
        scheme, _, token = authorization.partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
    # A real key is ~60 ASCII characters; anything else is refused without a database lookup.
    if not token or len(token) > 200 or not token.isascii() or "\x00" in token:
        limits.check_failed_auth(client_address(request))
        if not authorization:
            raise Unauthorized("send your API key as 'Authorization: Bearer <key>'")
        raise Unauthorized("the Authorization header must be 'Bearer <key>'")
    with request.app.state.sessionmaker() as db:
        key = lookup_key(db, token)
        if key is None:
            db.rollback()
            limits.check_failed_auth(client_address(request))
            raise Unauthorized("unknown or revoked API key", code="invalid_api_key")
        principal = Principal(tenant_id=key.tenant_id, key_id=key.id)
        now = utcnow()
        # Touch last_used_at at most once a minute: reads must not all become writes.
        if key.last_used_at is None or now - key.last_used_at > timedelta(minutes=1):
            key.last_used_at = now
            db.commit()
        else:
            db.rollback()
    limits.check_key(principal.key_id)
    return principal


PrincipalDep = Annotated[Principal, Depends(current_principal)]
