"""The report: every number the engine measured, and how.

Versioned (`schema_version`); defined once here and written by the engine, served by the
API and read by the SDK.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

SCHEMA_VERSION = "1.0"


class BeforeAfter(BaseModel):
    before: float
    after: float

    @property
    def ratio(self) -> float:
        return self.after / self.before if self.before else float("nan")


class TargetResult(BaseModel):
    kind: str = Field(description="flops | params | layers")
    requested: float | None
    achieved: float = Field(description="Fraction of the original kept (MACs or params).")
    tolerance: float
    met: bool
    measured_on: str = "exported ONNX graphs"


class AccuracyResult(BaseModel):
    before: float = Field(description="top-1, fraction 0..1")
    after: float
    drop: float = Field(description="before - after, in percentage points")
    top5_before: float | None = None
    top5_after: float | None = None
    samples: int
    measured_with: str = "onnxruntime on the exported ONNX, test split"


class LatencyResult(BaseModel):
    batch_size: int
    before: float = Field(description="median ms")
    after: float
    speedup: float
    runs: int
    p90_before: float
    p90_after: float


class LayerRow(BaseModel):
    name: str
    op: str
    channels_before: int
    channels_after: int
    macs_before: int
    macs_after: int


class ExcludedLayer(BaseModel):
    name: str
    reason: str


class GateResult(BaseModel):
    name: str
    limit: float
    value: float
    passed: bool


class Report(BaseModel):
    schema_version: str = SCHEMA_VERSION
    task: str
    method: dict[str, Any]
    recovery: dict[str, Any]
    target: TargetResult
    macs: BeforeAfter
    params: BeforeAfter
    accuracy: AccuracyResult | None = None
    metrics: dict[str, BeforeAfter] = Field(
        default_factory=dict, description="Task-specific metrics (e.g. loss, perplexity)."
    )
    latency_ms: list[LatencyResult]
    file_bytes: BeforeAfter
    parity: dict[str, float]
    layers: list[LayerRow]
    excluded: list[ExcludedLayer]
    gates: list[GateResult] = Field(default_factory=list)
    method_details: dict[str, Any] = Field(
        default_factory=dict, description="What the method learned or decided (widths, curves)."
    )
    stage_seconds: dict[str, float]
    notes: list[str] = Field(default_factory=list)
    seed: int
    model_sha256: str
    spec_hash: str
    versions: dict[str, str]
    device: str

    @property
    def gates_passed(self) -> bool:
        return all(g.passed for g in self.gates)
