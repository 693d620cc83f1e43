"""The job spec: what a user asks Prunery to do.

Defined once here (the SDK depends only on pydantic) and imported by the API, the workers
and the engine, so a spec that validates on the client validates everywhere.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    GetCoreSchemaHandler,
    Tag,
    model_validator,
)
from pydantic_core import core_schema

Task = Literal["classification", "language_modeling"]


MAX_IMAGE_SIDE = 1024  # bound of data.image_size (pixels per side)


# NaN and ±Infinity are refused everywhere in a spec: they cannot be stored as JSON in
# Postgres and no field has a meaning for them.
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class MethodSpec(_Strict):
    name: str = Field(
        max_length=64, description="A registered method name, e.g. 'l1_norm' (GET /v1/methods)."
    )
    params: dict[str, Any] = Field(
        default_factory=dict, description="Method parameters, validated by the method's schema."
    )


FLOAT_KINDS = ("flops", "params", "latency")
SWEEP_POINTS = (2, 8)  # a budget sweep has this many points, at least and at most


def _shape(value: Any) -> str:
    return "sweep" if isinstance(value, (list, tuple)) else "fraction"


_Fraction = Annotated[float, Field(gt=0.0, le=1.0)]


class Sweep(list[float]):
    """The points of a budget sweep: a list of fractions, serialised as a JSON list. It is
    never one number: `float(sweep)` raises (code written for one target cannot take a
    sweep for its first point by accident; the engine runs `Target.points()`)."""

    def __float__(self) -> float:
        raise TypeError(
            f"a budget sweep {list(self)} has one fraction per point; use Target.points()"
        )

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        points = Annotated[
            list[_Fraction], Field(min_length=SWEEP_POINTS[0], max_length=SWEEP_POINTS[1])
        ]
        return core_schema.no_info_after_validator_function(cls, handler.generate_schema(points))


# One fraction, or a budget sweep: a list of 2..8 distinct fractions (one pruned model each).
# The callable discriminator picks the branch by the value's shape, so an error names only
# the branch that was meant (`target.flops.fraction: ...` or `target.flops.sweep.1: ...`).
FractionOrSweep = Annotated[
    Annotated[_Fraction, Tag("fraction")] | Annotated[Sweep, Tag("sweep")],
    Discriminator(_shape),
]


class Target(_Strict):
    """The budget. Exactly one of flops / params / latency / layers.

    flops, params and latency may each be a list of 2..8 distinct fractions: a **budget
    sweep**, one pruned model per point (`points()` gives each point's scalar Target)."""

    flops: FractionOrSweep | None = Field(
        default=None,
        description="Fraction of the original MACs to keep, or a list of 2..8 fractions "
        "(a budget sweep: one pruned model per point and a Pareto table).",
    )
    params: FractionOrSweep | None = Field(
        default=None,
        description="Fraction of the original parameters to keep, or a list of 2..8 (a sweep).",
    )
    latency: FractionOrSweep | None = Field(
        default=None,
        description="Fraction of the original's measured latency to keep (onnxruntime, batch "
        "`latency_batch`); the allocation is searched against measured latency of the pruned "
        "network. A list of 2..8 fractions is a sweep.",
    )
    latency_batch: int = Field(
        default=1, ge=1, le=4096, description="Batch size at which target.latency is measured."
    )
    layers: dict[Annotated[str, Field(max_length=256)], float] | None = Field(
        default=None,
        max_length=10_000,
        description="Explicit per-layer pruning ratios {layer name: fraction of channels to remove}.",
    )
    tolerance: float = Field(
        default=0.01,
        gt=0.0,
        le=0.2,
        description="Allowed |achieved - requested|, as a fraction of the original "
        "(default 0.01; for a latency target 5% of the request, for a latency sweep 5% of "
        "its smallest point). A sweep applies it to every point.",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> Target:
        given = [
            k for k in ("flops", "params", "latency", "layers") if getattr(self, k) is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "target needs exactly one of 'flops', 'params', 'latency' or 'layers' "
                f'(got {given or "none"}); e.g. {{"flops": 0.5}}'
            )
        sweep = self.sweep_values
        if sweep is not None:
            labels = [f"{v:g}" for v in sweep]
            twice = sorted({t for t in labels if labels.count(t) > 1})
            if twice:
                raise ValueError(
                    f"target.{self.kind}: the points of a sweep must be distinct "
                    f"({', '.join(twice)} given twice); e.g. [0.75, 0.5, 0.25]"
                )
        if self.latency is not None and "tolerance" not in self.model_fields_set:
            # Measured latency is noisy: the default is +-5% of the requested fraction (of
            # the smallest point of a sweep: one stored number, never looser than 5%).
            smallest = min(self.latency) if isinstance(self.latency, list) else self.latency
            self.tolerance = round(0.05 * smallest, 6)
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
    def sweep_values(self) -> list[float] | None:
        """The points of a budget sweep, in the order given; None for a single target."""
        for key in FLOAT_KINDS:
            value = getattr(self, key)
            if isinstance(value, list):
                return [float(v) for v in value]
        return None

    @property
    def is_sweep(self) -> bool:
        return self.sweep_values is not None

    @property
    def fraction(self) -> float | None:
        """The single fraction of a flops/params/latency target (None for layers). A sweep
        has one per point: ask `points()` (the engine runs each point as its own target)."""
        for key in FLOAT_KINDS:
            value = getattr(self, key)
            if isinstance(value, list):
                raise ValueError(f"target.{key} is a sweep {value}: use Target.points()")
            if value is not None:
                return float(value)
        return None

    def points(self) -> list[Target]:
        """One scalar Target per point of a sweep (in the order given), each with this
        target's tolerance and latency batch; a single target is its own only point."""
        values = self.sweep_values
        if values is None:
            return [self]
        return [
            Target.model_validate(
                {
                    self.kind: v,
                    "latency_batch": self.latency_batch,
                    "tolerance": self.tolerance,
                }
            )
            for v in values
        ]

    @property
    def labels(self) -> list[str]:
        """A name per point: `flops-0.75` (what a sweep's artifact names start with)."""
        return [f"{p.kind}-{p.fraction:g}" for p in self.points()]


class Distillation(_Strict):
    """Knowledge distillation from the unpruned model during recovery (Hinton et al. 2015)."""

    enabled: bool = Field(
        default=True, description="learn from the original model's logits as well as the labels"
    )
    alpha: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="weight of the distillation term; the label cross-entropy gets 1 - alpha",
    )
    temperature: float = Field(
        default=2.0, gt=0.0, le=100.0, description="softmax temperature of both models' logits"
    )


# recovery.batch_size null: the largest of 64, 32, 16 that gives an epoch this many steps.
MIN_STEPS_PER_EPOCH = 40
MAX_AUTO_BATCH, MIN_AUTO_BATCH = 64, 16


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
    lr: float | None = Field(
        default=None,
        gt=0.0,
        le=10.0,
        description="learning rate of the recovery fine-tune. null (default): chosen among "
        "`lr_choices` by validation accuracy on a part of the training split (never the test "
        "split); training inside a method and from scratch use the first choice",
    )
    lr_choices: list[Annotated[float, Field(gt=0.0, le=10.0)]] = Field(
        default_factory=lambda: [1e-3, 3e-3],
        min_length=1,
        max_length=6,
        description="learning rates tried when `lr` is null: each fine-tunes a copy of the pruned "
        "model for `lr_screen_epochs` on the training split minus a validation part, and the "
        "best validation accuracy wins (ties go to the earlier one); one entry skips the choice",
    )
    lr_screen_epochs: float | None = Field(
        default=None,
        gt=0.0,
        le=100.0,
        description="epochs (may be a fraction) each of `lr_choices` trains on the training split "
        "minus the validation part before it is scored; null (default): `epochs`, the whole "
        "fine-tune (a learning rate ranked after a shorter run is biased towards small ones). "
        "The winner then fine-tunes the pruned network on the whole training split",
    )
    batch_size: int | None = Field(
        default=None,
        ge=1,
        le=65536,
        description="training batch size. null (default): 64, halved (not below 16) while one "
        f"epoch of the job's training split would be fewer than {MIN_STEPS_PER_EPOCH} steps, so a "
        "few-epoch fine-tune of a small dataset still makes enough updates (digits' 1437 "
        "training images: 32). The report's `recovery.batch_size_used` gives the batch used. "
        "Training loops inside a method (flop, tas, anp, sanp) use 64 unless it is given",
    )
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0)
    schedule: Literal["cosine", "constant"] = "cosine"
    distill: Distillation = Field(
        default_factory=Distillation,
        description='distillation from the original model (on by default; {"enabled": false} to train on labels only)',
    )

    @property
    def base_lr(self) -> float:
        """The learning rate of training that is not the chosen fine-tune: `lr` when given,
        else the first of `lr_choices`."""
        return self.lr if self.lr is not None else self.lr_choices[0]

    def lr_screen_for(self, epochs: float) -> float:
        """Epochs each of `lr_choices` trains before it is scored, for a fine-tune of `epochs`."""
        return epochs if self.lr_screen_epochs is None else min(self.lr_screen_epochs, epochs)

    def batch_for(self, train_samples: int | None) -> int:
        """The training batch size for a training split of `train_samples` (see `batch_size`)."""
        if self.batch_size is not None:
            return self.batch_size
        bs = MAX_AUTO_BATCH
        while (
            bs > MIN_AUTO_BATCH
            and train_samples is not None
            and train_samples < MIN_STEPS_PER_EPOCH * bs
        ):
            bs //= 2
        return bs

    @property
    def method_batch(self) -> int:
        """The batch of the training loops inside a method (FLOP, TAS, ANP, SANP): `batch_size`,
        else 64, the batch their defaults were tuned at."""
        return self.batch_size if self.batch_size is not None else MAX_AUTO_BATCH

    def choosing_lr(self) -> bool:
        """Whether the fine-tune's learning rate is chosen by validation."""
        return self.lr is None and len(set(self.lr_choices)) > 1


class ExportSpec(_Strict):
    opset: int = Field(default=17, ge=11, le=23)
    round_to: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description="Keep channel counts a multiple of this. Default (null): chosen per layer by "
        "timing its convolution/matmul at candidate widths on the target runtime (see README, "
        "'Latency-first pruning').",
    )
    max_layer_cut: float = Field(
        default=0.9,
        gt=0.0,
        lt=1.0,
        description="Largest fraction of one group's channels the budget may remove (refuses to gut a layer).",
    )


class Gates(_Strict):
    max_accuracy_drop: float | None = Field(
        default=None,
        ge=0.0,
        le=100.0,
        description="Largest allowed top-1 drop, in percentage points; the job fails its gate when missed.",
    )
    allow_target_miss: bool = Field(
        default=False,
        description="Count a run whose achieved budget is outside target.tolerance as passing (by default it fails the 'target' gate).",
    )
    min_speedup: float | None = Field(
        default=1.0,
        ge=0.0,
        le=1000.0,
        description="Smallest allowed measured speedup (original / pruned median latency, onnxruntime) "
        "at every reported batch size, allowing 3% measurement noise: a batch size fails when its "
        "median is below the line and a sign test over the interleaved runs says it is not chance "
        "(p <= 0.05); null disables the gate.",
    )
    min_speedup_floor_ms: float = Field(
        default=0.0,
        ge=0.0,
        le=60_000.0,
        description="Optionally judge min_speedup only at the batch sizes where the original's median "
        "latency is at least this many milliseconds (the report says which were judged). The default "
        "0 judges every batch size; the sign test already keeps timer noise from failing a job.",
    )


class DataSpec(_Strict):
    """How to read the dataset (image-folder archives need resize and normalisation)."""

    split: float = Field(
        default=0.2, gt=0.0, lt=1.0, description="Test fraction for an .npz holding only x, y."
    )
    image_size: (
        tuple[
            Annotated[int, Field(ge=1, le=MAX_IMAGE_SIDE)],
            Annotated[int, Field(ge=1, le=MAX_IMAGE_SIDE)],
        ]
        | None
    ) = Field(default=None, description="Resize images of an archive to (height, width).")
    grayscale: bool = False
    mean: list[Annotated[float, Field(ge=-1e6, le=1e6)]] | None = Field(
        default=None, min_length=1, max_length=16, description="Per-channel mean subtracted."
    )
    std: list[Annotated[float, Field(gt=0.0, le=1e6)]] | None = Field(
        default=None, min_length=1, max_length=16, description="Per-channel std divided by."
    )
    scale: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        description="Integer image arrays in an .npz (e.g. uint8) are cast to float32 and multiplied "
        "by this before mean/std are applied; default 1/255 for uint8, 1 for other integer types.",
    )


class PruneSchedule(_Strict):
    steps: int = Field(
        default=1,
        ge=1,
        le=20,
        description="progressive pruning: reach the target in this many steps (MACs kept falls geometrically), "
        "with an equal share of the recovery epochs after each step; the total epochs stay recovery.epochs",
    )


WebhookEvent = Literal["running", "cancelling", "succeeded", "failed", "cancelled"]


class Webhook(_Strict):
    """POST the public job JSON to `url` when the job enters one of `events`, signed with the
    tenant's webhook secret (`X-Prunery-Signature: t=...,v1=...`; `prunery.webhooks.verify`)."""

    url: str = Field(min_length=8, max_length=2048, description="http(s) URL of your receiver.")
    events: list[WebhookEvent] = Field(
        default_factory=lambda: list[WebhookEvent](["succeeded", "failed", "cancelled"]),
        min_length=1,
        description="Job states that trigger a delivery (default: the terminal ones).",
    )

    @model_validator(mode="after")
    def _check_url(self) -> Webhook:
        from urllib.parse import urlsplit

        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"webhook.url must be an http:// or https:// URL with a host, not {self.url!r}"
            )
        if parts.username or parts.password:
            raise ValueError("webhook.url must not carry credentials; verify the signature instead")
        return self


class JobSpec(_Strict):
    model_id: str | None = None
    dataset_id: str | None = None
    eval_dataset_id: str | None = None
    task: Task = "classification"
    method: MethodSpec = Field(
        default_factory=lambda: MethodSpec(name="auto"),
        description="the pruning method; by default 'auto' tries candidates on a validation split and keeps the best",
    )
    target: Target
    schedule: PruneSchedule = Field(default_factory=PruneSchedule)
    recovery: Recovery = Field(default_factory=Recovery)
    export: ExportSpec = Field(default_factory=ExportSpec)
    gates: Gates = Field(default_factory=Gates)
    data: DataSpec = Field(default_factory=DataSpec)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    webhook: Webhook | None = None

    def spec_hash(self) -> str:
        """sha256 of the canonical JSON of what determines the result (ids excluded)."""
        body = self.model_dump(
            mode="json", exclude={"model_id", "dataset_id", "eval_dataset_id", "webhook"}
        )
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
