"""GET /v1/jobs/{id}/events: a job's events as Server-Sent Events (or one JSON list).

Each poll is its own short transaction: no database connection is held between polls, and the
stream holds one of the tenant's stream slots until it ends."""

from __future__ import annotations

import asyncio
import json
import weakref
from collections.abc import AsyncIterator

from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from starlette.requests import Request
from starlette.responses import Response

from app.features.jobs.schemas import JobEventPublic
from app.features.jobs.service import get_job
from core.orm import Job, JobEvent
from core.settings import Settings
from prunery.types import TERMINAL


def events_after(
    factory: sessionmaker[Session], job_id: str, after: int, limit: int = 500
) -> tuple[list[JobEventPublic], str]:
    """Up to `limit` public events after id `after`, and the job's status."""
    with factory() as session:
        rows = session.scalars(
            select(JobEvent)
            .where(JobEvent.job_id == job_id, JobEvent.id > after, JobEvent.kind != "debug")
            .order_by(JobEvent.id)
            .limit(limit)
        ).all()
        status = session.scalar(select(Job.status).where(Job.id == job_id)) or "failed"
        return [JobEventPublic.model_validate(r) for r in rows], status


def _check_owned(factory: sessionmaker[Session], tenant_id: str, job_id: str) -> None:
    with factory() as session:
        get_job(session, tenant_id, job_id)


def _wants_json(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return "application/json" in accept and "text/event-stream" not in accept


async def respond(
    request: Request, settings: Settings, tenant_id: str, job_id: str, after: int
) -> Response:
    """The JSON list (Accept: application/json) or the event stream, after the owner check."""
    factory: sessionmaker[Session] = request.app.state.sessionmaker
    await run_in_threadpool(_check_owned, factory, tenant_id, job_id)
    if _wants_json(request):
        events, _ = await run_in_threadpool(events_after, factory, job_id, after, 10_000)
        return JSONResponse([e.model_dump(mode="json") for e in events])

    lease = request.app.state.caps.acquire("stream", tenant_id)  # 429 past the cap

    async def stream() -> AsyncIterator[str]:
        try:
            async for chunk in _follow(request, settings, factory, job_id, after):
                yield chunk
        finally:
            lease.release()

    body = stream()
    weakref.finalize(body, lease.release)  # also when the stream never started
    return StreamingResponse(
        body,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _follow(
    request: Request,
    settings: Settings,
    factory: sessionmaker[Session],
    job_id: str,
    after: int,
) -> AsyncIterator[str]:
    loop = asyncio.get_running_loop()
    cursor = after
    last_sent = loop.time()
    ends_at = last_sent + settings.max_stream_duration_s
    yield "retry: 2000\n\n"
    while loop.time() < ends_at:
        events, status = await run_in_threadpool(events_after, factory, job_id, cursor)
        for ev in events:
            cursor = ev.id
            yield f"id: {ev.id}\nevent: {ev.kind}\ndata: {ev.model_dump_json()}\n\n"
            last_sent = loop.time()
        if not events and status in TERMINAL:
            yield f"event: end\ndata: {json.dumps({'status': status})}\n\n"
            return
        if await request.is_disconnected():
            return
        if loop.time() - last_sent > settings.events_keepalive_s:
            yield ": keep-alive\n\n"
            last_sent = loop.time()
        if not events:
            await asyncio.sleep(settings.events_poll_interval_s)
