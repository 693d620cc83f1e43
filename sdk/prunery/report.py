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
    achieved: float = Field(description="Fraction of the original kept (MACs, params or measured latency).")
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
    latency_before_us: float | None = Field(default=None, description="the layer alone, onnxruntime, batch 1")
    latency_after_us: float | None = None


class ExcludedLayer(BaseModel):
    name: str
    reason: str


class GateResult(BaseModel):
    name: str
    limit: float
    value: float
    passed: bool
    message: str | None = None


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
        ("MACs", _fmt_int(report.macs.before), _fmt_int(report.macs.after), f"x{report.macs.ratio:.3f}"),
        ("Parameters", _fmt_int(report.params.before), _fmt_int(report.params.after), f"x{report.params.ratio:.3f}"),
        ("File bytes", _fmt_int(report.file_bytes.before), _fmt_int(report.file_bytes.after), f"x{report.file_bytes.ratio:.3f}"),
    ]
    if report.accuracy is not None:
        a = report.accuracy
        rows.append(("Top-1 accuracy", f"{a.before:.4f}", f"{a.after:.4f}", f"{-a.drop:+.2f} pts"))
        if a.top5_before is not None and a.top5_after is not None:
            rows.append(("Top-5 accuracy", f"{a.top5_before:.4f}", f"{a.top5_after:.4f}", f"{(a.top5_after - a.top5_before) * 100:+.2f} pts"))
    for name, m in report.metrics.items():
        rows.append((name, f"{m.before:.4f}", f"{m.after:.4f}", f"x{m.ratio:.3f}"))
    for lat in report.latency_ms:
        rows.append((f"Latency batch {lat.batch_size} (ms, median)", f"{lat.before:.3f}", f"{lat.after:.3f}", f"{lat.speedup:.2f}x faster"))
    return rows


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
        "Latency: onnxruntime CPU, the two models timed alternately, median of "
        f"{report.latency_ms[0].runs if report.latency_ms else 0} runs after warm-up.",
    ]
    if report.gates:
        lines += ["", "## Gates", "", "| gate | limit | value | result |", "|---|---:|---:|---|"]
        lines += [f"| {g.name} | {g.limit} | {g.value:.3f} | {'pass' if g.passed else 'FAIL'} |" for g in report.gates]
        lines += [f"- {g.name}: {g.message}" for g in report.gates if g.message]
    timed = any(r.latency_before_us is not None for r in report.layers)
    lines += ["", "## Layers", "", "| layer | op | channels | MACs before | MACs after |" + (" µs before → after |" if timed else ""),
              "|---|---|---:|---:|---:|" + ("---:|" if timed else "")]
    for row in report.layers:
        lat = (
            f" {row.latency_before_us:.1f} → {row.latency_after_us:.1f} |"
            if timed and row.latency_before_us is not None and row.latency_after_us is not None
            else (" |" if timed else "")
        )
        lines.append(
            f"| `{row.name}` | {row.op} | {row.channels_before} → {row.channels_after} | "
            f"{_fmt_int(row.macs_before)} | {_fmt_int(row.macs_after)} |{lat}"
        )
    if report.excluded:
        lines += ["", "## Excluded from pruning", "", "| layer | reason |", "|---|---|"]
        lines += [f"| `{e.name}` | {e.reason.replace('|', '/')} |" for e in report.excluded]
    if report.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report.notes]
    lines += [
        "",
        "## Run",
        "",
        f"- recovery: {report.recovery.get('mode_used')} for {report.recovery.get('epochs_used')} epochs",
        f"- stage seconds: {', '.join(f'{k} {v:.1f}' for k, v in report.stage_seconds.items())}",
        f"- seed {report.seed}; model sha256 `{report.model_sha256[:16]}…`; spec hash `{report.spec_hash[:16]}…`",
        f"- device: {report.device}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in sorted(report.versions.items()))}",
        f"- report schema {report.schema_version}",
        "",
    ]
    return "\n".join(lines)
