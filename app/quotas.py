"""Per-tenant quotas: stored bytes, uploads per hour, concurrent uploads (429 + Retry-After).

`guarded_upload` is the one way an upload route receives a file: it checks the tenant's
upload rate and storage before reading a byte, holds one of the tenant's concurrent-upload
slots while the body streams (no database connection is held meanwhile), and checks the
storage quota again with the real size.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import timedelta

from fastapi.concurrency import run_in_threadpool
from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.requests import Request

from app.errors import TooManyRequests
from app.features.files.multipart import Upload, receive_upload
from core.orm import DatasetFile, Job, ModelFile, utcnow
from core.settings import Settings


def stored_bytes(session: Session, tenant_id: str) -> int:
    """Models + datasets + job artifacts of one tenant."""
    total = 0
    for cls in (ModelFile, DatasetFile):
        total += int(
            session.scalar(
                select(func.coalesce(func.sum(cls.size_bytes), 0)).where(cls.tenant_id == tenant_id)
            )
            or 0
        )
    for artifacts in session.scalars(
        select(Job.artifacts).where(Job.tenant_id == tenant_id, Job.artifacts.is_not(None))
    ):
        total += sum(
            int(a.get("size", 0)) for a in (artifacts or {}).values() if isinstance(a, dict)
        )
    return total


def check_queue(session: Session, settings: Settings, tenant_id: str) -> None:
    """Queued jobs per tenant, counting jobs cancelled before they started in the last 10
    minutes: their broker messages may still be waiting, so submit+cancel churn counts
    against the tenant until the workers have skipped them."""
    cap = settings.max_queued_jobs_per_tenant
    if cap <= 0:
        return
    recent = utcnow() - timedelta(minutes=10)
    queued = (
        session.scalar(
            select(func.count())
            .select_from(Job)
            .where(
                Job.tenant_id == tenant_id,
                or_(
                    Job.status == "queued",
                    and_(
                        Job.status == "cancelled",
                        Job.started_at.is_(None),
                        Job.finished_at > recent,
                    ),
                ),
            )
        )
        or 0
    )
    if queued >= cap:
        raise TooManyRequests(
            f"you have {queued} jobs queued or cancelled before they started in the last 10 "
            f"minutes (limit {cap}); wait for the queue to drain",
            code="too_many_queued_jobs",
            headers={"Retry-After": "60"},
        )


def check_storage(
    factory: sessionmaker[Session], settings: Settings, tenant_id: str, incoming: int
) -> None:
    quota = settings.storage_quota_bytes_per_tenant
    if quota <= 0:
        return
    with factory() as session:
        used = stored_bytes(session, tenant_id)
    if used + incoming > quota:
        raise TooManyRequests(
            f"storage quota exceeded: you store {used / 1e9:.2f} GB and this upload needs "
            f"{incoming / 1e9:.2f} GB more (quota {quota / 1e9:.2f} GB); delete models, "
            "datasets or jobs (DELETE /v1/jobs/{id}) first",
            code="storage_quota",
            headers={"Retry-After": "3600"},
        )


@asynccontextmanager
async def guarded_upload(
    request: Request,
    tenant_id: str,
    max_bytes: int,
    suffix_for: Callable[[str], str],
) -> AsyncIterator[Upload]:
    state = request.app.state
    settings: Settings = state.settings
    async with state.caps.hold("upload", tenant_id):
        state.rate_limits.check_upload(tenant_id)
        await run_in_threadpool(check_storage, state.sessionmaker, settings, tenant_id, 0)
        up = await receive_upload(
            request,
            state.storage.staging_dir(),
            max_bytes,
            suffix_for=suffix_for,
            idle_timeout_s=settings.upload_idle_timeout_s,
            max_duration_s=settings.upload_max_duration_s,
        )
        try:
            await run_in_threadpool(check_storage, state.sessionmaker, settings, tenant_id, up.size)
            yield up  # the slot is held while the route checks and stores the file too
        finally:
            up.cleanup()
