"""What can be pruned, before any GPU time is spent: the analysis of one model.

Written by `prunery analyze` and `POST /v1/models/{id}/analysis`, and by every job next to
its report (`analysis.json`, also when the job fails with `budget_unreachable`). Defined
here so the SDK, the CLI and the HTML report read the same shape.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from prunery.errors import PruneryError

ANALYSIS_SCHEMA_VERSION = "1.0"


class AnalysisFailed(PruneryError):
    """The analysis job failed (the message says why) or did not finish in time."""


class GroupLayer(BaseModel):
    name: str
    op: str
    role: str = Field(description="out: its output channels go; in: its input channels go")


class PrunableGroup(BaseModel):
    name: str = Field(description="the group's root layer")
    channels: int = Field(description="coupled channels in the group (its width)")
    min_channels: int = Field(description="the fewest channels the budget allocator keeps")
    layers: list[GroupLayer]
    macs: int = Field(description="MACs per sample of the layers the group touches (out and in)")
    params: int = Field(description="parameters of the layers the group touches")
    macs_share: float = Field(
        description="macs / the model's MACs (groups overlap: a layer's input and output are in two groups)"
    )
    params_share: float


class ExcludedGroup(BaseModel):
    name: str
    reason: str


class MethodApplicability(BaseModel):
    name: str
    applies: bool
    reason: str | None = Field(default=None, description="why not, when it does not apply")


class StepCosts(BaseModel):
    """What one step of each kind took on the machine that analysed the model."""

    device: str = Field(description="where the torch steps were timed (the job's default device)")
    batch_size: int = Field(description="the batch the steps were timed at (recovery.batch_size)")
    train_step_seconds: float = Field(
        description="one optimizer step: forward, backward and update on one batch (mean of 5 after 2 warm-up steps)"
    )
    eval_batch_seconds: float = Field(description="one forward pass on one batch without gradients")
    export_seconds: float | None = Field(
        default=None, description="one ONNX export of the model (with onnxslim); null if it failed"
    )
    ort_batch_seconds: dict[str, float] = Field(
        default_factory=dict,
        description="onnxruntime CPU forward of the exported model per batch size (mean of 5)",
    )


class TimeEstimate(BaseModel):
    """An estimate of a job's wall time for one spec, from measured per-step costs."""

    method: str
    epochs: int = Field(description="recovery.epochs of the spec")
    batch_size: int
    train_samples: int | None = Field(description="training samples (null without a dataset)")
    test_samples: int | None
    steps_per_epoch: int | None = Field(description="ceil(train_samples / batch_size)")
    measured: StepCosts
    parts: dict[str, float] = Field(
        description="seconds per part: analysis (load and analyse, measured), method (its own "
        "passes), recovery, verify (accuracy and latency in onnxruntime), export"
    )
    total_seconds: float | None = Field(description="sum of the parts; null without a dataset")
    formula: str
    assumptions: list[str] = Field(default_factory=list)


class Analysis(BaseModel):
    schema_version: str = ANALYSIS_SCHEMA_VERSION
    task: str
    input_shape: list[int] = Field(
        description="the sample shape the analysis ran with (batch first)"
    )
    macs: int = Field(description="MACs per sample of the model")
    params: int
    round_to: int | None = None  # None: widths are measured per layer at prune time
    groups: list[PrunableGroup]
    excluded: list[ExcludedGroup]
    prunable_macs_share: float = Field(
        description="share of MACs in layers some prunable group touches"
    )
    min_macs_fraction: float = Field(
        description="smallest reachable fraction of MACs (every group at its minimum width)"
    )
    min_params_fraction: float
    methods: list[MethodApplicability]
    notes: list[str] = Field(default_factory=list)
    seconds: float = Field(default=0.0, description="wall time of the analysis")
    time_estimate: TimeEstimate | None = Field(
        default=None,
        description="estimated job time for a spec (the default one unless given), from measured step costs",
    )


def _fmt(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f}"


def render_text(a: Analysis, max_rows: int = 60) -> str:
    """The terminal table printed by `prunery analyze` and `prunery model-analysis`."""
    lines = [
        f"model: {_fmt(a.macs)} MACs, {_fmt(a.params)} parameters per sample of shape {a.input_shape}",
        f"prunable groups: {len(a.groups)}  excluded: {len(a.excluded)}  "
        f"MACs in prunable layers: {a.prunable_macs_share:.1%}",
        f"smallest reachable: {a.min_macs_fraction:.3f} of the MACs, {a.min_params_fraction:.3f} of the "
        f"parameters (every group at its minimum width, round_to={a.round_to or 1})",
        "",
    ]
    rows = [("group", "channels", "min", "MACs share", "params share", "layers")]
    for g in a.groups[:max_rows]:
        rows.append(
            (
                g.name,
                str(g.channels),
                str(g.min_channels),
                f"{g.macs_share:.1%}",
                f"{g.params_share:.1%}",
                ", ".join(f"{m.name}({m.role})" for m in g.layers[:4])
                + (" …" if len(g.layers) > 4 else ""),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for i, r in enumerate(rows):
        lines.append(
            "  ".join(
                c.ljust(widths[j]) if j in (0,) else c.rjust(widths[j]) for j, c in enumerate(r[:5])
            )
            + "  "
            + r[5]
        )
        if i == 0:
            lines.append("  ".join("-" * w for w in widths) + "  ------")
    if len(a.groups) > max_rows:
        lines.append(f"… {len(a.groups) - max_rows} more groups (--json for all)")
    if a.excluded:
        lines += ["", "excluded layers:"]
        lines += [f"  {e.name}: {e.reason}" for e in a.excluded]
    lines += ["", "methods:"]
    for m in a.methods:
        lines.append(f"  {m.name:20s} {'yes' if m.applies else 'no: ' + (m.reason or '')}")
    if a.time_estimate is not None:
        lines += ["", *estimate_text(a.time_estimate)]
    if a.notes:
        lines += ["", "notes:"] + [f"  {n}" for n in a.notes]
    return "\n".join(lines)


def _dur(seconds: float) -> str:
    s = max(0.0, seconds)
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def estimate_text(e: TimeEstimate) -> list[str]:
    """The estimate's lines of the analysis table."""
    m = e.measured
    head = (
        f"estimated job time: {_dur(e.total_seconds)}"
        if e.total_seconds is not None
        else "estimated job time: unknown without a dataset (--data gives the sample counts)"
    )
    steps = (
        f"{e.steps_per_epoch} steps/epoch"
        if e.steps_per_epoch is not None
        else "steps/epoch unknown"
    )
    lines = [
        f"{head}  (method {e.method}, {e.epochs} recovery epochs x {steps}, batch {e.batch_size})",
        f"  measured on {m.device}: train step {m.train_step_seconds * 1e3:.1f} ms, "
        f"eval batch {m.eval_batch_seconds * 1e3:.1f} ms"
        + (f", export {m.export_seconds:.2f} s" if m.export_seconds is not None else "")
        + "".join(
            f", onnxruntime batch {b} {v * 1e3:.2f} ms" for b, v in m.ort_batch_seconds.items()
        ),
    ]
    if e.parts:
        lines.append("  " + ", ".join(f"{k} {_dur(v)}" for k, v in e.parts.items()))
    lines.append(f"  formula: {e.formula}")
    lines += [f"  assumes: {a}" for a in e.assumptions]
    return lines
