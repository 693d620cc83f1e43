"""GET /v1/jobs/{id}/report.html: the report as one self-contained page (inline SVG/CSS)."""

from __future__ import annotations

import json

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from app.deps import PrincipalDep, SessionDep, StorageDep
from app.errors import Conflict, NotFound, error_responses
from app.models import Job
from prunery.analysis import Analysis
from prunery.html_report import render_html
from prunery.report import Report

router = APIRouter(tags=["jobs"])

# The page needs nothing from anywhere: forbid every fetch, allow only its inline CSS.
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


@router.get(
    "/v1/jobs/{job_id}/report.html",
    response_class=HTMLResponse,
    summary="The job's report as a self-contained HTML page with plots",
    responses={200: {"content": {"text/html": {}}}} | error_responses(401, 404, 409, 429),
)
def job_report_html(
    job_id: str, db: SessionDep, principal: PrincipalDep, storage: StorageDep
) -> HTMLResponse:
    job = db.get(Job, job_id)
    if job is None or job.tenant_id != principal.tenant_id:
        raise NotFound(f"no job {job_id!r}; list yours with GET /v1/jobs")
    if job.report is None:
        raise Conflict(
            f"job {job.id} is {job.status}; the report exists once it has succeeded",
            code="report_not_ready",
        )
    analysis = None
    entry = (job.artifacts or {}).get("analysis.json")
    if entry:
        try:
            analysis = Analysis.model_validate(
                json.loads(b"".join(storage.open_chunks(entry["key"])))
            )
        except Exception:  # the page is still useful without the analysis panel
            analysis = None
    report = Report.model_validate(job.report)
    page = render_html(
        report, analysis, title=f"Prunery report — {report.method.get('name')} ({job.id})"
    )
    return HTMLResponse(
        page,
        headers={"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"},
    )
