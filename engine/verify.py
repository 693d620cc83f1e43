"""The pipeline's export and verify stages: the pruned network to ONNX, its parity with
torch proven on real and random inputs, and every number of the report measured on the
exported graphs with onnxruntime (MACs, parameters, accuracy or LM metrics, latency)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import onnx
import torch

from engine import export as export_mod
from engine import latency as latency_mod
from engine import load
from engine.flops import Costs, onnx_costs
from engine.prepare import Prepared, dynamic_batch
from engine.stages import LATENCY_BATCHES
from engine.tracker import Tracker
from prunery.report import AccuracyResult, BeforeAfter, LatencyResult


@dataclass
class Verified:
    """The export and verify stages' output (everything measured on the ONNX graphs)."""

    pruned_onnx: onnx.ModelProto
    pruned_bytes: bytes
    base_bytes: bytes
    max_abs_diff: float
    max_rel_diff: float
    cost_before: Costs
    cost_after: Costs
    accuracy: AccuracyResult | None
    metrics: dict[str, BeforeAfter]
    latencies: list[LatencyResult]


def _baseline(prep: Prepared) -> tuple[onnx.ModelProto, bytes]:
    """The original with a dynamic batch (re-exported when the uploaded graph's is fixed)."""
    loaded = prep.loaded.model
    base_onnx = dynamic_batch(loaded.onnx_model)
    base_bytes = base_onnx.SerializeToString()
    try:
        load.ort_session(base_bytes).run(None, {loaded.input_name: prep.data.x_test[:32].numpy()})
    except Exception:
        prep.notes.append(
            "the uploaded graph has a fixed batch size; the baseline was re-exported with a dynamic batch for timing"
        )
        base_onnx = export_mod.export_onnx(
            loaded.module, prep.example, prep.spec.export.opset, input_name=loaded.input_name
        )
        base_bytes = base_onnx.SerializeToString()
    return base_onnx, base_bytes


def check_parity(
    prep: Prepared, model: torch.nn.Module, pruned_bytes: bytes
) -> tuple[float, float]:
    """Worst absolute and relative torch-vs-onnxruntime difference on test and random inputs;
    raises `ExportFailed` past `load.PARITY_RTOL`."""
    loaded, spec = prep.loaded, prep.spec
    session = load.ort_session(pruned_bytes)
    worst_diff, worst_rel = 0.0, 0.0
    probes = [prep.data.x_test[:64].numpy()] + [
        load.random_input(
            [4, *loaded.sample_shape], loaded.model.input_dtype, spec.seed + k, loaded.vocab
        )
        for k in range(2)
    ]
    for x in probes:
        diff, rel = load.parity(model, session, loaded.model.input_name, x)
        worst_diff, worst_rel = max(worst_diff, diff), max(worst_rel, rel)
    if not worst_rel <= load.PARITY_RTOL:
        raise export_mod.ExportFailed(
            f"the exported pruned model disagrees with torch (relative error {worst_rel:.2e}); not publishing it"
        )
    return worst_diff, worst_rel


def quality(
    prep: Prepared, base_bytes: bytes, pruned_bytes: bytes
) -> tuple[AccuracyResult | None, dict[str, BeforeAfter]]:
    """Test-split accuracy (classification) or LM metrics, before and after, by onnxruntime."""
    name = prep.loaded.model.input_name
    y, x_test = prep.data.y_test.numpy(), prep.data.x_test.numpy()
    logits_before = export_mod.onnx_predict(base_bytes, name, x_test)
    logits_after = export_mod.onnx_predict(pruned_bytes, name, x_test)
    if prep.spec.task == "language_modeling":
        lb, la = export_mod.lm_metrics(logits_before, y), export_mod.lm_metrics(logits_after, y)
        return None, {k: BeforeAfter(before=lb[k], after=la[k]) for k in lb}
    acc_b, acc_a = (
        export_mod.topk_accuracy(logits_before, y, 1),
        export_mod.topk_accuracy(logits_after, y, 1),
    )
    top5 = logits_before.shape[1] >= 5
    return AccuracyResult(
        before=acc_b,
        after=acc_a,
        drop=(acc_b - acc_a) * 100.0,
        top5_before=export_mod.topk_accuracy(logits_before, y, 5) if top5 else None,
        top5_after=export_mod.topk_accuracy(logits_after, y, 5) if top5 else None,
        samples=len(y),
        measured_with=f"onnxruntime on the exported ONNX, {prep.loaded.evaluation['dataset']}",
    ), {}


def latency_batches(prep: Prepared) -> list[int]:
    target = prep.spec.target
    return sorted({*LATENCY_BATCHES, target.latency_batch if target.kind == "latency" else 1})


def measure_latency(
    prep: Prepared,
    base_bytes: bytes,
    pruned_bytes: bytes,
    batches: Sequence[int],
    tracker: Tracker,
    *,
    runs: int = 30,
    threads: int | None = None,
) -> list[LatencyResult]:
    """Median onnxruntime latency per batch size, interleaved with the original (a series
    that would fail min_speedup is repeated once, longer)."""
    name, x_test = prep.loaded.model.input_name, prep.data.x_test.numpy()
    out: list[LatencyResult] = []
    for i, bs in enumerate(batches):
        tracker.report("verify", 0.6 + 0.35 * i / len(batches), f"latency at batch {bs}")

        def timed(r: int, bs: int = bs) -> tuple[export_mod.Latency, export_mod.Latency]:
            return export_mod.interleaved_latency(
                base_bytes, pruned_bytes, name, name, x_test[:bs], bs, runs=r, threads=threads
            )

        first = timed(runs)
        if first[0].series > 1:
            prep.notes.append(
                f"batch {bs}: the latency series was disturbed (most runs over "
                f"{export_mod.DISTURBED}x its fastest tenth: load from outside the job) and "
                f"measured {first[0].series} times; the quietest is reported (median / 10th "
                f"percentile {first[0].disturbance:.2f})"
            )
        before, after = latency_mod.confirm_if_slow(prep.spec, *first, prep.notes, timed)
        if before is first[0]:  # not measured again yet
            before, after = latency_mod.confirm_latency_target(
                prep.spec, bs, before, after, prep.notes, timed
            )
        limit = prep.spec.gates.min_speedup
        out.append(
            LatencyResult(
                batch_size=bs,
                before=round(before.median_ms, 4),
                after=round(after.median_ms, 4),
                speedup=round(before.median_ms / after.median_ms, 3)
                if after.median_ms
                else float("nan"),
                runs=before.runs,
                p90_before=round(before.p90_ms, 4),
                p90_after=round(after.p90_ms, 4),
                pairs_below_gate=None
                if limit is None
                else latency_mod.pairs_below(before.times_ms, after.times_ms, limit),
                threads=export_mod.threads_label(threads),
            )
        )
    return out


def export_and_verify(
    prep: Prepared,
    model: torch.nn.Module,
    tracker: Tracker | None = None,
    *,
    latency_runs: int = 30,
    latency_threads: int | None = None,
    batches: Sequence[int] | None = None,
) -> Verified:
    """Export `model` (the recovered network), prove parity, measure. `batches` defaults to
    the report's latency batch sizes; `()` skips timing (benchmarks that only need accuracy)."""
    tracker = tracker or Tracker()
    tracker.begin("export")
    name = prep.loaded.model.input_name
    pruned_onnx = export_mod.export_onnx(
        model, prep.example, prep.spec.export.opset, input_name=name
    )
    pruned_bytes = pruned_onnx.SerializeToString()
    base_onnx, base_bytes = _baseline(prep)
    tracker.begin("verify")
    worst_diff, worst_rel = check_parity(prep, model, pruned_bytes)
    tracker.report("verify", 0.2, "counting MACs and parameters on the ONNX graphs")
    feed1 = {name: prep.data.x_test[:1].numpy()}
    cost_before, cost_after = onnx_costs(base_onnx, feed1), onnx_costs(pruned_onnx, feed1)
    tracker.report("verify", 0.4, "accuracy on the test split (onnxruntime)")
    accuracy, metrics = quality(prep, base_bytes, pruned_bytes)
    latencies = measure_latency(
        prep,
        base_bytes,
        pruned_bytes,
        latency_batches(prep) if batches is None else batches,
        tracker,
        runs=latency_runs,
        threads=latency_threads,
    )
    return Verified(
        pruned_onnx,
        pruned_bytes,
        base_bytes,
        worst_diff,
        worst_rel,
        cost_before,
        cost_after,
        accuracy,
        metrics,
        latencies,
    )
