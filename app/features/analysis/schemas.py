"""The analysis family: AnalysisCreate, AnalysisPublic (the result is prunery.analysis.Analysis)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.schemas import ErrorBody
from prunery.analysis import Analysis
from prunery.spec import ExportSpec, JobSpec, MethodSpec, Recovery, Target


class EstimateSpec(BaseModel):
    """The part of a job spec the job-time estimate depends on (the SDK's own models, so it
    validates exactly as at submit); what is left out gets the job defaults."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    method: MethodSpec = Field(
        default_factory=lambda: MethodSpec(name="auto"),
        description="the method to estimate, e.g. {'name': 'l1_norm'} (default 'auto')",
    )
    target: Target = Field(
        default_factory=lambda: Target(flops=0.5), description="default {'flops': 0.5}"
    )
    recovery: Recovery = Field(
        default_factory=Recovery, description="epochs, batch_size, mode, distillation"
    )
    export: ExportSpec = Field(default_factory=ExportSpec, description="opset of the timed export")

    def job_spec(self, task: str) -> JobSpec:
        return JobSpec.model_validate({**self.model_dump(mode="json"), "task": task})


class AnalysisCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset_id: str | None = Field(
        default=None,
        description="Probe with this dataset's samples (else random inputs of the declared shape). "
        "The time estimate needs it for steps per epoch and the total.",
    )
    task: Literal["classification", "language_modeling"] = "classification"
    round_to: int = Field(default=1, ge=1, le=256)
    spec: EstimateSpec | None = Field(
        default=None,
        description="Estimate the job time for this spec (method, target, recovery, export as "
        "in POST /v1/jobs); default: the job defaults (method 'auto', 3 epochs, batch 64).",
    )

    @model_validator(mode="after")
    def _spec_is_a_job_spec(self) -> AnalysisCreate:
        if self.spec is not None:
            self.spec.job_spec(self.task)  # its cross-field checks, as at submit
        return self


class AnalysisPublic(BaseModel):
    id: str
    model_id: str
    dataset_id: str | None
    status: Literal["queued", "running", "succeeded", "failed"]
    params: dict[str, Any]
    result: Analysis | None = None
    error: ErrorBody | None = None
    created_at: datetime
    finished_at: datetime | None = None
