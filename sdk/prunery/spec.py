"""The job spec: what a user asks Prunery to do.

Defined once here (the SDK depends only on pydantic) and imported by the API, the workers
and the engine, so a spec that validates on the client validates everywhere.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Task = Literal["classification", "language_modeling"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MethodSpec(_Strict):
    name: str = Field(description="A registered method name, e.g. 'l1_norm' (GET /v1/methods).")
    params: dict[str, Any] = Field(
        default_factory=dict, description="Method parameters, validated by the method's schema."
    )


class Target(_Strict):
    """The budget. Exactly one of flops / params / latency / layers."""

    flops: float | None = Field(
        default=None, gt=0.0, le=1.0, description="Fraction of the original MACs to keep."
    )
    params: float | None = Field(
        default=None, gt=0.0, le=1.0, description="Fraction of the original parameters to keep."
    )
    latency: float | None = Field(
        default=None, gt=0.0, le=1.0,
        description="Fraction of the original's measured latency to keep (onnxruntime, batch "
        "`latency_batch`); the allocation is searched against measured latency of the pruned network.",
    )
    latency_batch: int = Field(
        default=1, ge=1, le=4096, description="Batch size at which target.latency is measured."
    )
    layers: dict[str, float] | None = Field(
        default=None,
        description="Explicit per-layer pruning ratios {layer name: fraction of channels to remove}.",
    )
    tolerance: float = Field(
        default=0.01,
        gt=0.0,
        le=0.2,
        description="Allowed |achieved - requested|, as a fraction of the original "
        "(default 0.01; for a latency target 5% of the request).",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> Target:
        given = [k for k in ("flops", "params", "latency", "layers") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "target needs exactly one of 'flops', 'params', 'latency' or 'layers' "
                f"(got {given or 'none'}); e.g. {{\"flops\": 0.5}}"
            )
        if self.latency is not None and "tolerance" not in self.model_fields_set:
            # Measured latency is noisy: the default is +-5% of the requested fraction.
            self.tolerance = round(0.05 * self.latency, 6)
        if self.layers is not None:
            for name, ratio in self.layers.items():
                if not 0.0 <= ratio < 1.0:
                    raise ValueError(
                        f"target.layers[{name!r}] = {ratio}: a pruning ratio must be in [0, 1)"
                    )
        return self

    @property
    def kind(self) -> Literal["flops", "params", "latency", "layers"]:
        if self.flops is not None:
            return "flops"
        if self.params is not None:
            return "params"
        if self.latency is not None:
            return "latency"
        return "layers"

    @property
    def fraction(self) -> float | None:
        for value in (self.flops, self.params, self.latency):
            if value is not None:
                return value
        return None


class Recovery(_Strict):
    mode: Literal["finetune", "scratch", "none"] = Field(
        default="finetune",
        description="finetune inherited weights, re-initialise and train ('scratch'), or skip.",
    )
    epochs: int = Field(default=3, ge=0, le=1000)
    epochs_mode: Literal["E", "B"] = Field(
        default="E",
        description="Scratch only: 'E' trains `epochs`; 'B' scales them by MACs_full/MACs_pruned "
        "(Scratch-B of 'Rethinking the Value of Network Pruning').",
    )
    lr: float = Field(default=1e-3, gt=0.0, le=10.0)
    batch_size: int = Field(default=64, ge=1, le=65536)
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0)
    schedule: Literal["cosine", "constant"] = "cosine"


class ExportSpec(_Strict):
    opset: int = Field(default=17, ge=11, le=23)
    round_to: int | None = Field(
        default=None, ge=1, le=256,
        description="Keep channel counts a multiple of this. Default (null): chosen per layer by "
        "timing its convolution/matmul at candidate widths on the target runtime (see README, "
        "'Latency-first pruning').",
    )


class Gates(_Strict):
    max_accuracy_drop: float | None = Field(
        default=None,
        ge=0.0,
        le=100.0,
        description="Largest allowed top-1 drop, in percentage points; the job fails its gate when missed.",
    )
    min_speedup: float | None = Field(
        default=1.0,
        ge=0.0,
        le=1000.0,
        description="Smallest allowed measured speedup (original / pruned median latency, onnxruntime) "
        "at every reported batch size, allowing 3% measurement noise; null disables the gate.",
    )


class DataSpec(_Strict):
    """How to read the dataset (image-folder archives need resize and normalisation)."""

    split: float = Field(
        default=0.2, gt=0.0, lt=1.0, description="Test fraction for an .npz holding only x, y."
    )
    image_size: tuple[int, int] | None = Field(
        default=None, description="Resize images of an archive to (height, width)."
    )
    grayscale: bool = False
    mean: list[float] | None = None
    std: list[float] | None = None


class JobSpec(_Strict):
    model_id: str | None = None
    dataset_id: str | None = None
    eval_dataset_id: str | None = None
    task: Task = "classification"
    method: MethodSpec
    target: Target
    recovery: Recovery = Field(default_factory=Recovery)
    export: ExportSpec = Field(default_factory=ExportSpec)
    gates: Gates = Field(default_factory=Gates)
    data: DataSpec = Field(default_factory=DataSpec)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)

    def spec_hash(self) -> str:
        """sha256 of the canonical JSON of what determines the result (ids excluded)."""
        body = self.model_dump(mode="json", exclude={"model_id", "dataset_id", "eval_dataset_id"})
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
