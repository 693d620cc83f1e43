"""Schemas core renders for both the API and the worker: the error shape and the job as the
client sees it (core.jobs.lifecycle.to_public). Every other request/response schema lives
with its feature in app/features/<name>/schemas.py."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from prunery.types import JobStatus

__all__ = ["ErrorBody", "JobPublic", "JobStatus"]


class ErrorBody(BaseModel):
    """The one JSON shape of every error the API answers (rendered by app.errors)."""

    error: str = Field(description="Machine-readable code, e.g. 'not_found', 'validation_error'.")
    detail: str = Field(description="What went wrong and how to fix it.")


class JobPublic(BaseModel):
    id: str
    status: JobStatus
    stage: str | None
    progress: float = Field(ge=0.0, le=1.0)
    message: str | None = None
    error: ErrorBody | None = Field(
        default=None, description="Why the job failed or was cancelled."
    )
    gates_passed: bool | None = Field(
        default=None,
        description="Set when the job succeeded: false means the model was produced but a gate "
        "(e.g. max_accuracy_drop) was missed — see report.gates.",
    )
    attempts: int
    max_attempts: int
    model_id: str | None
    model_name: str | None = Field(
        default=None,
        description="The model's uploaded file name (null once the model is deleted).",
    )
    method: str | None = Field(
        default=None,
        description="The pruning method: the spec's, or for 'auto' the one it chose once the "
        "report is written.",
    )
    dataset_id: str | None
    spec: dict[str, Any]
    artifacts: list[str] = Field(default_factory=list)
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    heartbeat_at: datetime | None = None
