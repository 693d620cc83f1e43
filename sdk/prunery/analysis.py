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
    macs_share: float = Field(description="macs / the model's MACs (groups overlap: a layer's input and output are in two groups)")
    params_share: float


class ExcludedGroup(BaseModel):
    name: str
    reason: str


class MethodApplicability(BaseModel):
    name: str
    applies: bool
    reason: str | None = Field(default=None, description="why not, when it does not apply")


class Analysis(BaseModel):
    schema_version: str = ANALYSIS_SCHEMA_VERSION
    task: str
    input_shape: list[int] = Field(description="the sample shape the analysis ran with (batch first)")
    macs: int = Field(description="MACs per sample of the model")
    params: int
    round_to: int | None = None  # None: widths are measured per layer at prune time
    groups: list[PrunableGroup]
    excluded: list[ExcludedGroup]
    prunable_macs_share: float = Field(description="share of MACs in layers some prunable group touches")
    min_macs_fraction: float = Field(description="smallest reachable fraction of MACs (every group at its minimum width)")
    min_params_fraction: float
    methods: list[MethodApplicability]
    notes: list[str] = Field(default_factory=list)
    seconds: float = Field(default=0.0, description="wall time of the analysis")


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
        rows.append((g.name, str(g.channels), str(g.min_channels), f"{g.macs_share:.1%}", f"{g.params_share:.1%}",
                     ", ".join(f"{m.name}({m.role})" for m in g.layers[:4]) + (" …" if len(g.layers) > 4 else "")))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(widths[j]) if j in (0,) else c.rjust(widths[j]) for j, c in enumerate(r[:5])) + "  " + r[5])
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
    if a.notes:
        lines += ["", "notes:"] + [f"  {n}" for n in a.notes]
    return "\n".join(lines)
