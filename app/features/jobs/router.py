"""/v1/jobs: submit, list, inspect, cancel, delete, follow (SSE), report (JSON and HTML) and
artifacts. Thin: parse, call jobs.service, render. report.html is folded in here (it is a
view of the job's report, not a resource of its own)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from app.abuse import MAX_EVENT_ID, parse_last_event_id
from app.deps import (
    CeleryDep,
    PrincipalDep,
    SessionDep,
    SessionFactoryDep,
    SettingsDep,
    StorageDep,
)
from app.errors import error_responses
from app.features.common import PageDep
from app.features.jobs import events, service
from app.features.jobs.schemas import JobCreate, JobPublic, JobsPublic
from core.jobs.public import to_public
from prunery.types import JobStatus

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

ARTIFACT_TYPES = {
    ".onnx": "application/octet-stream",
    ".json": "application/json",
    ".md": "text/markdown; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".html": "text/html; charset=utf-8",
    ".csv": "text/csv; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
    ".pt2": "application/zip",
}

# The report page needs nothing from anywhere: forbid every fetch, allow only its inline CSS.
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


@router.get(
    "/{job_id}/report.html",
    response_class=HTMLResponse,
    summary="The job's report as a self-contained HTML page with plots",
    responses=error_responses(401, 404, 409, 429, ok={"content": {"text/html": {}}}),
)
def job_report_html(
    job_id: str, db: SessionDep, principal: PrincipalDep, storage: StorageDep
) -> HTMLResponse:
    page = service.report_page(db, storage, principal.tenant_id, job_id)
    return HTMLResponse(
        page, headers={"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"}
    )


@router.post(
    "",
    status_code=202,
    response_model=JobPublic,
    summary="Submit a pruning job",
    description="Validates the spec against the method's params schema and applicability, "
    "stores the job and enqueues it after the transaction commits. Send an `Idempotency-Key` "
    "header to make retries safe: the same key with the same body returns the same job; with "
    "a different body it is a 409.",
    responses=error_responses(400, 401, 409, 422, 429),
)
def create_job(
    spec: JobCreate,
    response: Response,
    db: SessionDep,
    principal: PrincipalDep,
    settings: SettingsDep,
    celery: CeleryDep,
    factory: SessionFactoryDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> JobPublic:
    done = service.submit(db, settings, celery, factory, principal.tenant_id, spec, idempotency_key)
    response.headers["Location"] = f"/v1/jobs/{done.job.id}"
    if done.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return to_public(done.job)


@router.get("", response_model=JobsPublic, responses=error_responses(401, 422, 429))
def list_jobs(
    db: SessionDep,
    principal: PrincipalDep,
    window: PageDep,
    status: Annotated[list[JobStatus] | None, Query(description="Repeat to match several.")] = None,
) -> JobsPublic:
    return service.list_jobs(db, principal.tenant_id, status, window)


@router.get("/{job_id}", response_model=JobPublic, responses=error_responses(401, 404, 429))
def get_job(job_id: str, db: SessionDep, principal: PrincipalDep) -> JobPublic:
    return to_public(service.get_job(db, principal.tenant_id, job_id))


@router.post(
    "/{job_id}/cancel",
    status_code=202,
    response_model=JobPublic,
    description="A queued job is cancelled at once; a running one goes to `cancelling` and "
    "stops at the engine's next step. Cancelling a cancelled/cancelling job is a no-op; a "
    "finished job is a 409.",
    responses=error_responses(401, 404, 409, 429),
)
def cancel_job(job_id: str, db: SessionDep, principal: PrincipalDep) -> JobPublic:
    return to_public(service.cancel(db, principal.tenant_id, job_id))


@router.delete(
    "/{job_id}",
    status_code=204,
    summary="Delete a finished job with its events and artifacts",
    description="A queued or running job is a 409: cancel it first. Artifacts are removed "
    "from storage before the row, so nothing is left behind.",
    responses=error_responses(401, 404, 409, 429),
)
def delete_job(
    job_id: str, db: SessionDep, principal: PrincipalDep, storage: StorageDep
) -> Response:
    service.delete_job(db, storage, principal.tenant_id, job_id)
    return Response(status_code=204)


@router.get(
    "/{job_id}/events",
    summary="Follow a job: Server-Sent Events of state, progress and log lines",
    description="`text/event-stream` (default): replays events after `Last-Event-ID` (or "
    "`after`), then streams new ones until the job ends. With `Accept: application/json`, "
    "returns the events after `after` as a JSON list instead.",
    responses=error_responses(
        400, 401, 404, 429, ok={"content": {"text/event-stream": {}, "application/json": {}}}
    ),
)
async def job_events(
    job_id: str,
    request: Request,
    principal: PrincipalDep,
    settings: SettingsDep,
    after: Annotated[int, Query(ge=0, le=MAX_EVENT_ID)] = 0,
    last_event_id: Annotated[str | None, Header(max_length=64)] = None,
) -> Response:
    resume = parse_last_event_id(last_event_id)  # 400 unless a plain event id
    if resume is not None:
        after = max(after, resume)
    return await events.respond(request, settings, principal.tenant_id, job_id, after)


@router.get(
    "/{job_id}/report",
    summary="The job's report (prunery.report.Report as JSON)",
    responses=error_responses(401, 404, 409, 429, ok={"content": {"application/json": {}}}),
)
def job_report(job_id: str, db: SessionDep, principal: PrincipalDep) -> JSONResponse:
    _, body = service.report(db, principal.tenant_id, job_id)
    return JSONResponse(body)


@router.get(
    "/{job_id}/artifacts/{name}",
    summary="Download an artifact: model.onnx, report.json, report.md, or any file the job lists",
    responses=error_responses(401, 404, 409, 429, ok={"content": {"application/octet-stream": {}}}),
)
def job_artifact(
    job_id: str, name: str, db: SessionDep, principal: PrincipalDep, storage: StorageDep
) -> Response:
    job, entry = service.artifact(db, principal.tenant_id, job_id, name)
    size = storage.size(entry["key"])
    return StreamingResponse(
        storage.open_chunks(entry["key"]),
        media_type=ARTIFACT_TYPES.get(Path(name).suffix, "application/octet-stream"),
        headers={
            "Content-Length": str(size),
            "Content-Disposition": f'attachment; filename="{job.id}-{name}"',
            "X-Content-SHA256": entry.get("sha256", ""),
        },
    )
