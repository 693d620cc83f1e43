"""Request and response schemas: one family per resource (XCreate, XPublic, XsPublic)."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.errors import ErrorBody
from prunery.spec import JobSpec

JobStatus = Literal["queued", "running", "cancelling", "succeeded", "failed", "cancelled"]


class _Public(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class ModelPublic(_Public):
    id: str
    filename: str
    sha256: str
    size_bytes: int
    created_at: datetime
    opset: int
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    op_histogram: dict[str, int]
    parameter_count: int
    producer: str = ""


class ModelsPublic(BaseModel):
    data: list[ModelPublic]
    count: int


class DatasetPublic(_Public):
    id: str
    filename: str
    format: str = Field(description=".npz, .zip, .tar or .tar.gz")
    sha256: str
    size_bytes: int
    created_at: datetime
    task: str
    train: int
    test: int
    sample_shape: list[int]
    x_dtype: str
    num_classes: int
    classes: list[str] | None = None


class DatasetsPublic(BaseModel):
    data: list[DatasetPublic]
    count: int


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

    model_id: str = Field(max_length=64, description="An uploaded model (POST /v1/models).")  # type: ignore[assignment]
    dataset_id: str = Field(max_length=64, description="An uploaded dataset (POST /v1/datasets).")  # type: ignore[assignment]
    eval_dataset_id: str | None = Field(default=None, max_length=64)

    @model_validator(mode="before")
    @classmethod
    def _only_storable(cls, data: Any) -> Any:
        _storable(data)
        return data


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
    dataset_id: str | None
    spec: dict[str, Any]
    artifacts: list[str] = Field(default_factory=list)
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    heartbeat_at: datetime | None = None


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


class MethodPublic(BaseModel):
    name: str
    summary: str
    paper: str
    tasks: list[str]
    params_schema: dict[str, Any]


class MethodsPublic(BaseModel):
    data: list[MethodPublic]
    count: int


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready", "unavailable"]
    checks: dict[str, str]
