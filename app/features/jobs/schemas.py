"""The job family: JobCreate, JobPublic, JobsPublic, JobEventPublic.

JobPublic (with ErrorBody) lives in core.schemas because core.jobs.lifecycle renders it for
the worker too; it is re-exported here so the family reads in one place."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.schemas import JobPublic
from prunery.spec import JobSpec

__all__ = ["JobCreate", "JobPublic", "JobsPublic", "JobEventPublic"]


def _storable(value: Any, where: str = "", depth: int = 0) -> None:
    """Refuse what Postgres cannot store in JSON/text (NUL, NaN, ±Infinity) and absurd nesting,
    anywhere in the body — method params included — as a 422 naming the field."""
    if depth > 32:
        raise ValueError(f"{where or 'body'}: nested more than 32 levels deep")
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError(f"{where or 'body'}: strings must not contain NUL characters")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where or 'body'}: {value} is not a finite number")
    elif isinstance(value, dict):
        for k, v in value.items():
            _storable(k, where, depth + 1)
            _storable(v, f"{where}.{k}" if where else str(k), depth + 1)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _storable(v, f"{where}[{i}]", depth + 1)


class JobCreate(JobSpec):
    """The job spec (see DESIGN.md); model_id and dataset_id are required here."""

    model_id: str = Field(max_length=64, description="An uploaded model (POST /v1/models).")
    dataset_id: str = Field(max_length=64, description="An uploaded dataset (POST /v1/datasets).")
    eval_dataset_id: str | None = Field(default=None, max_length=64)

    @model_validator(mode="before")
    @classmethod
    def _only_storable(cls, data: Any) -> Any:
        _storable(data)
        return data


class JobsPublic(BaseModel):
    data: list[JobPublic]
    count: int = Field(description="Total matching jobs (all pages).")
    limit: int
    offset: int


class JobEventPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    at: datetime
    kind: Literal["state", "progress", "log"]
    status: str | None = None
    stage: str | None = None
    progress: float | None = None
    message: str | None = None
