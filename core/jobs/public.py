"""The public view of a job row (what the API returns and a webhook carries)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import object_session

from core.orm import Job, ModelFile
from core.schemas import ErrorBody, JobPublic


def _model_name(job: Job) -> str | None:
    """The model row's file name, from the job's session (an identity-map hit when the caller
    loaded the page's models first, as `GET /v1/jobs` does)."""
    if not job.model_id:
        return None
    session = object_session(job)
    model = session.get(ModelFile, job.model_id) if session is not None else None
    return model.filename if model is not None else None


def _method(job: Job) -> str | None:
    """The method that ran: the report's (auto's choice) once written, else the spec's."""
    ran = (job.report or {}).get("method")
    if isinstance(ran, dict) and isinstance(ran.get("name"), str):
        return str(ran["name"])
    asked = (job.spec or {}).get("method")
    if isinstance(asked, dict) and isinstance(asked.get("name"), str):
        return str(asked["name"])
    return None


def to_public(job: Job, model_name: str | None = None) -> JobPublic:
    """`model_name` saves the lookup when the caller already knows it."""
    error = None
    if job.error_code:
        error = ErrorBody(error=job.error_code, detail=job.error_detail or job.error_code)
    artifacts: dict[str, Any] = job.artifacts or {}
    return JobPublic(
        id=job.id,
        status=job.status,  # type: ignore[arg-type]
        stage=job.stage,
        progress=min(1.0, max(0.0, job.progress)),
        message=job.message,
        error=error,
        gates_passed=job.gates_passed,
        attempts=job.attempts,
        max_attempts=job.max_attempts,
        model_id=job.model_id,
        model_name=model_name if model_name is not None else _model_name(job),
        method=_method(job),
        dataset_id=job.dataset_id,
        spec=job.spec,
        artifacts=sorted(artifacts),
        created_at=job.created_at,
        updated_at=job.updated_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        heartbeat_at=job.heartbeat_at,
    )
