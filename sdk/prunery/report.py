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
    kind: str = Field(description="flops | params | latency | layers")
    requested: float | None
    achieved: float = Field(
        description="Fraction of the original kept (MACs, params or measured latency)."
    )
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
    pairs_below_gate: int | None = Field(
        default=None,
        description="of the `runs` interleaved pairs, how many ran slower than gates.min_speedup "
        "allows (the gate's sign test; null when the gate is off)",
    )
    threads: str | None = Field(
        default=None,
        description="onnxruntime intra-op threads of the timing: '1 thread' (the default: two "
        "sessions' thread pools timed alternately compete, which made multi-threaded ratios "
        "noise on small models), 'N threads' or 'all cores' (`--ort-threads`)",
    )


class LayerRow(BaseModel):
    name: str = Field(description="the engine's layer name (the converted module's name)")
    source: str | None = Field(
        default=None,
        description="the layer's module path in the exporter's source model (e.g. `features.0`, "
        "`layer1.0.conv1`), read from the ONNX graph's weight names or scope metadata; "
        "target.layers accepts it as well as `name`",
    )
    op: str
    channels_before: int
    channels_after: int
    macs_before: int
    macs_after: int
    latency_before_us: float | None = Field(
        default=None, description="the layer alone, onnxruntime, batch 1"
    )
    latency_after_us: float | None = None

    @property
    def display_name(self) -> str:
        """The readable name: the source module path where known, else the engine's name."""
        return self.source or self.name


class ExcludedLayer(BaseModel):
    name: str
    reason: str
    source: str | None = Field(
        default=None,
        description="The exporter's source module path (e.g. 'fc'), when the ONNX carries it",
    )

    @property
    def display_name(self) -> str:
        """The readable name: the source module path where known, else the engine's name."""
        return self.source or self.name


class GateResult(BaseModel):
    name: str
    limit: float
    value: float
    passed: bool
    message: str | None = None


# A budget sweep point's files are stored and downloaded as `<label>__<file>`, e.g.
# `flops-0.5__model.onnx` (artifact names are plain file names: no folders).
SWEEP_SEPARATOR = "__"


def sweep_artifact_name(label: str, name: str) -> str:
    return f"{label}{SWEEP_SEPARATOR}{name}"


class SweepPoint(BaseModel):
    """One point of a budget sweep (`target.flops: [0.75, 0.5, 0.25]`): the numbers of its
    own report (`<label>__report.json`), measured like any job's."""

    label: str = Field(description="e.g. 'flops-0.75': the prefix of the point's artifact names")
    target: TargetResult
    macs_ratio: float = Field(description="MACs after / before (ONNX graphs)")
    params_ratio: float = Field(description="parameters after / before")
    accuracy: float | None = Field(default=None, description="top-1 after, fraction 0..1")
    accuracy_drop: float | None = Field(default=None, description="top-1 drop, points")
    latency_ms: dict[int, float] = Field(
        default_factory=dict, description="{batch size: the pruned model's median ms}"
    )
    speedup: dict[int, float] = Field(
        default_factory=dict, description="{batch size: original / pruned median latency}"
    )
    gates_passed: bool
    failed_gates: list[str] = Field(default_factory=list)
    pareto: bool = Field(
        description="no other point has at least its accuracy with at most its MACs and at "
        "least its speedup at every batch size (and is better in one of them)"
    )
    selected: bool = Field(
        description="this point's model and report are the job's model.onnx and report.json"
    )
    artifacts: dict[str, str] = Field(
        default_factory=dict,
        description="{file: artifact name}, e.g. {'model.onnx': 'flops-0.75__model.onnx'}",
    )


class Report(BaseModel):
    schema_version: str = SCHEMA_VERSION
    task: str
    method: dict[str, Any]
    recovery: dict[str, Any]
    target: TargetResult
    macs: BeforeAfter
    params: BeforeAfter
    accuracy: AccuracyResult | None = None
    evaluation: dict[str, Any] | None = Field(
        default=None,
        description="Which data the accuracy, metrics and latency were measured on: the job's "
        "test split, or the evaluation dataset (eval_dataset_id) with its sample count.",
    )
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
    robustness: dict[str, Any] | None = Field(
        default=None, description="Adversarial accuracy before/after, with the attack's parameters."
    )
    dynamic: dict[str, Any] | None = Field(
        default=None,
        description="Dynamic (per-sample gated) models: measured mean/std MACs over the evaluation set.",
    )
    stage_seconds: dict[str, float]
    notes: list[str] = Field(default_factory=list)
    seed: int
    model_sha256: str
    spec_hash: str
    versions: dict[str, str]
    device: str
    sweep: list[SweepPoint] | None = Field(
        default=None,
        description="A budget sweep's points, in the order requested (the rest of this report "
        "is the selected point's); null for a single target.",
    )

    @property
    def gates_passed(self) -> bool:
        return all(g.passed for g in self.gates)


def _fmt_int(n: float) -> str:
    n = float(n)
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3f} {unit}"
    return f"{n:.0f}"


def summary_rows(report: Report) -> list[tuple[str, str, str, str]]:
    """(metric, before, after, change) rows shared by the Markdown and the terminal table."""
    rows = [
        (
            "MACs",
            _fmt_int(report.macs.before),
            _fmt_int(report.macs.after),
            f"x{report.macs.ratio:.3f}",
        ),
        (
            "Parameters",
            _fmt_int(report.params.before),
            _fmt_int(report.params.after),
            f"x{report.params.ratio:.3f}",
        ),
        (
            "File bytes",
            _fmt_int(report.file_bytes.before),
            _fmt_int(report.file_bytes.after),
            f"x{report.file_bytes.ratio:.3f}",
        ),
    ]
    if report.accuracy is not None:
        a = report.accuracy
        rows.append(("Top-1 accuracy", f"{a.before:.4f}", f"{a.after:.4f}", f"{-a.drop:+.2f} pts"))
        if a.top5_before is not None and a.top5_after is not None:
            rows.append(
                (
                    "Top-5 accuracy",
                    f"{a.top5_before:.4f}",
                    f"{a.top5_after:.4f}",
                    f"{(a.top5_after - a.top5_before) * 100:+.2f} pts",
                )
            )
    for name, m in report.metrics.items():
        rows.append((name, f"{m.before:.4f}", f"{m.after:.4f}", f"x{m.ratio:.3f}"))
    for lat in report.latency_ms:
        rows.append(
            (
                f"Latency batch {lat.batch_size} (ms, median)",
                f"{lat.before:.3f}",
                f"{lat.after:.3f}",
                f"{lat.speedup:.2f}x faster",
            )
        )
    return rows


def sweep_rows(report: Report) -> list[tuple[str, ...]]:
    """The sweep table (header first): point, the achieved fraction of a latency sweep,
    MACs and parameter fractions, top-1, drop, speedup per batch size, and marks: `P`
    Pareto-optimal, `*` the selected point (the job's model.onnx), `!gate` a gate missed.
    Empty for a single target."""
    if not report.sweep:
        return []
    batches = sorted({b for p in report.sweep for b in p.speedup})
    measured = any(p.target.kind == "latency" for p in report.sweep)
    header = (
        "point",
        *(("latency kept",) if measured else ()),
        "MACs",
        "params",
        "top-1",
        "drop pts",
        *(f"speedup b{b}" for b in batches),
        "",
    )
    rows: list[tuple[str, ...]] = [header]
    for p in report.sweep:
        marks = ("P" if p.pareto else "") + ("*" if p.selected else "")
        if p.failed_gates:
            marks += (" " if marks else "") + "!" + ",".join(p.failed_gates)
        rows.append(
            (
                p.label,
                *((f"{p.target.achieved:.3f}",) if measured else ()),
                f"{p.macs_ratio:.3f}",
                f"{p.params_ratio:.3f}",
                f"{p.accuracy:.4f}" if p.accuracy is not None else "-",
                f"{p.accuracy_drop:.2f}" if p.accuracy_drop is not None else "-",
                *(f"{p.speedup[b]:.2f}x" if b in p.speedup else "-" for b in batches),
                marks,
            )
        )
    return rows


SWEEP_LEGEND = (
    "P: Pareto-optimal (no other point has >= top-1, <= MACs and >= speedup at every batch "
    "size); *: the selected point (model.onnx, report.json); !gate: that gate missed. Each "
    "point's files are <point>__model.onnx, <point>__report.json, ..."
)


_TARGET_WORDS = {"params": "parameters", "flops": "MACs", "latency": "measured latency"}


def render_markdown(report: Report) -> str:
    t = report.target
    lines = [
        f"# Prunery report — {report.method['name']}",
        "",
        f"Target: keep **{t.requested}** of the {_TARGET_WORDS.get(t.kind, 'channels per layer list')}; "
        f"achieved **{t.achieved:.4f}** ({'met' if t.met else 'NOT met'}, tolerance {t.tolerance}; {t.measured_on}).",
        "",
        "| metric | before | after | change |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in summary_rows(report)]
    lines += [
        "",
        f"Parity (torch vs onnxruntime on the exported model): max abs diff {report.parity.get('max_abs_diff', 0):.2e}.",
        "",
        "MACs: Conv/ConvTranspose/Gemm/MatMul multiply-accumulates per sample, counted on the ONNX graphs. "
        "Accuracy: the exported ONNX in onnxruntime on the test split"
        + (f" ({report.accuracy.samples} samples)." if report.accuracy else "."),
        "Latency: onnxruntime CPU"
        + (
            f" ({report.latency_ms[0].threads})"
            if report.latency_ms and report.latency_ms[0].threads
            else ""
        )
        + ", the two models timed alternately, median of "
        f"{report.latency_ms[0].runs if report.latency_ms else 0} runs after warm-up.",
    ]
    if report.sweep:
        head, *body = sweep_rows(report)
        lines += ["", "## Budget sweep", "", "| " + " | ".join(head) + " |"]
        lines += ["|---|" + "---:|" * (len(head) - 2) + "---|"]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        lines += ["", SWEEP_LEGEND]
    if report.gates:
        lines += ["", "## Gates", "", "| gate | limit | value | result |", "|---|---:|---:|---|"]
        lines += [
            f"| {g.name} | {g.limit} | {g.value:.3f} | {'pass' if g.passed else 'FAIL'} |"
            for g in report.gates
        ]
        lines += [f"- {g.name}: {g.message}" for g in report.gates if g.message]
    timed = any(r.latency_before_us is not None for r in report.layers)
    lines += [
        "",
        "## Layers",
        "",
        "| layer | op | channels | MACs before | MACs after |"
        + (" µs before → after |" if timed else ""),
        "|---|---|---:|---:|---:|" + ("---:|" if timed else ""),
    ]
    for row in report.layers:
        lat = (
            f" {row.latency_before_us:.1f} → {row.latency_after_us:.1f} |"
            if timed and row.latency_before_us is not None and row.latency_after_us is not None
            else (" |" if timed else "")
        )
        lines.append(
            f"| `{row.display_name}` | {row.op} | {row.channels_before} → {row.channels_after} | "
            f"{_fmt_int(row.macs_before)} | {_fmt_int(row.macs_after)} |{lat}"
        )
    if report.excluded:
        lines += ["", "## Excluded from pruning", "", "| layer | reason |", "|---|---|"]
        lines += [f"| `{e.display_name}` | {e.reason.replace('|', '/')} |" for e in report.excluded]
    if report.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report.notes]
    lines += [
        "",
        "## Run",
        "",
        f"- recovery: {report.recovery.get('mode_used')} for {report.recovery.get('epochs_used')} epochs"
        + (
            f", lr {report.recovery['lr_used']:g}"
            + (" (chosen on validation)" if report.recovery.get("lr_choice") else "")
            if isinstance(report.recovery.get("lr_used"), (int, float))
            else ""
        )
        + (
            f", batch {report.recovery['batch_size_used']}"
            if report.recovery.get("batch_size_used")
            else ""
        ),
        f"- stage seconds: {', '.join(f'{k} {v:.1f}' for k, v in report.stage_seconds.items())}",
        f"- seed {report.seed}; model sha256 `{report.model_sha256[:16]}…`; spec hash `{report.spec_hash[:16]}…`",
        f"- device: {report.device}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in sorted(report.versions.items()))}",
        f"- report schema {report.schema_version}",
        "",
    ]
    return "\n".join(lines)
