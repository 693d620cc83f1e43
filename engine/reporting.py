"""The pipeline's report stage: the achieved budget, per-layer rows, gates, and the
artifacts (model.onnx, model.pt2, report.json/.md/.html) written atomically."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch

from engine import export as export_mod
from engine import graph, heads, torch_export
from engine import latency as latency_mod
from engine.flops import torch_costs
from engine.prepare import Prepared
from engine.stages import Pruned, Recovered
from engine.tracker import Tracker
from engine.uneven import uneven_cut_note
from engine.verify import Verified
from prunery.html_report import render_html
from prunery.report import (
    BeforeAfter,
    ExcludedLayer,
    GateResult,
    LayerRow,
    Report,
    TargetResult,
    render_markdown,
)


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in (
        "torch",
        "onnx",
        "onnxruntime",
        "onnx2torch",
        "torch-pruning",
        "onnxslim",
        "numpy",
    ):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    from prunery import __version__

    out["prunery"] = __version__
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _width(module: torch.nn.Module | None) -> int:
    if module is None:
        return 0
    layer: Any = module
    if hasattr(layer, "out_channels"):
        return int(layer.out_channels)
    if hasattr(layer, "out_features"):
        return int(layer.out_features)
    children = [
        m for m in module.modules() if hasattr(m, "out_features") or hasattr(m, "out_channels")
    ]
    return _width(children[-1]) if children else 0


def layer_rows(
    original: torch.nn.Module,
    pruned: torch.nn.Module,
    macs_before: dict[str, int],
    macs_after: dict[str, int],
    sources: dict[str, str] | None = None,
) -> list[LayerRow]:
    """Per Conv/Linear layer of the original: output width and MACs before → after. A layer
    the method replaced by several (a factorised Linear) is summed under its old name.
    `sources` maps engine names to the exporter's source module paths (`LoadedModel.source_names`)."""
    sources = sources or {}
    rows: list[LayerRow] = []
    new_modules = dict(pruned.named_modules())
    for name, mod in original.named_modules():
        if not isinstance(mod, graph.PRUNABLE_ROOTS):
            continue
        new = new_modules.get(name)
        op = type(mod).__name__
        if new is not None and not isinstance(new, graph.PRUNABLE_ROOTS):
            ranks = [m.out_features for m in new.modules() if isinstance(m, torch.nn.Linear)][:-1]
            op = f"{op} → {type(new).__name__}" + (f" (rank {ranks[0]})" if ranks else "")
        after = sum(v for k, v in macs_after.items() if k == name or k.startswith(name + "."))
        rows.append(
            LayerRow(
                name=name,
                source=sources.get(name),
                op=op,
                channels_before=_width(mod),
                channels_after=_width(new),
                macs_before=int(macs_before.get(name, 0)),
                macs_after=int(after),
            )
        )
    return rows


def achieved_target(
    prep: Prepared, pruned: Pruned, recovered: Recovered, verified: Verified
) -> TargetResult:
    """What was achieved of the target, measured on the exported graphs (latency: verify's
    own timing; dynamic models: the measured mean MACs)."""
    target, notes = prep.spec.target, prep.notes
    before, after = verified.cost_before, verified.cost_after
    measured_on = "exported ONNX graphs"
    dynamic = recovered.measured.get("dynamic", {})
    if target.kind == "params":
        achieved = after.params / before.params
    elif target.kind == "latency":
        lat_b = next(lat for lat in verified.latencies if lat.batch_size == target.latency_batch)
        achieved = lat_b.after / lat_b.before
        measured_on = (
            f"onnxruntime CPU latency of the exported ONNX at batch {lat_b.batch_size}, median of {lat_b.runs} "
            "runs interleaved with the original, measured in verify independently of the search"
        )
    elif pruned.result.dynamic and dynamic.get("macs_mean") is not None:
        achieved = float(dynamic["macs_mean"]) / before.macs
        notes.append(
            "dynamic model: the achieved MACs are the measured mean over the evaluation set; "
            "`macs.after` is the static count of the exported graph"
        )
    else:
        achieved = after.macs / before.macs
    requested = target.fraction
    met = requested is None or abs(achieved - requested) <= target.tolerance
    if not met and target.kind == "latency":
        searched = pruned.result.details.get("kept_latency_search")
        notes.append(
            f"achieved {achieved:.4f} of the original latency versus {requested} requested"
            + (f"; the search measured {searched} for the same widths" if searched else "")
            + ": two timings of one network differ by a few percent on a busy machine; "
            "run with more `--latency-runs`, or widen `target.tolerance`"
        )
    elif not met:
        notes.append(
            f"achieved {achieved:.4f} of the original {latency_mod.metric_words(target.kind)} "
            f"versus {requested} requested: the nearest reachable width (round_to={prep.spec.export.round_to}) is outside the tolerance"
        )
    return TargetResult(
        kind=target.kind,
        requested=requested,
        achieved=round(achieved, 6),
        tolerance=target.tolerance,
        met=met,
        measured_on=measured_on,
    )


def report_layers(
    prep: Prepared, pruned: Pruned, model: torch.nn.Module, verified: Verified, threads: int | None
) -> list[LayerRow]:
    """The per-layer table (with attention heads), annotated with measured kernel times."""
    if any(lat.speedup < 1.0 for lat in verified.latencies):
        odd = [
            n
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Conv2d) and m.groups == 1 and m.out_channels % 8
        ]
        if odd:
            prep.notes.append(
                f"{len(odd)} pruned conv layers have widths that are not multiples of 8, which fall off "
                "onnxruntime's blocked (NCHWc) convolution kernels on CPU; export.round_to = 8 usually "
                "turns that into a real speedup"
            )
    after_costs = torch_costs(model, prep.example)
    sources = prep.loaded.model.source_names
    layers = layer_rows(
        prep.module, model, prep.base_costs.per_layer, after_costs.per_layer, sources
    )
    for row in heads.report_rows(prep.module, model):
        if row.source is None and row.name in sources:
            row.source = sources[row.name]
        layers.append(row)
    latency = pruned.ctx.latency
    how = latency_mod.annotate_layers(
        layers, prep.module, model, prep.example, latency.timer if latency else None, threads
    )
    if how:
        prep.notes.append(how)
    return layers


def gates(
    prep: Prepared, target: TargetResult, layers: list[LayerRow], verified: Verified
) -> list[GateResult]:
    """The job's pass/fail checks: target, max_accuracy_drop, min_speedup."""
    spec, out = prep.spec, []
    if target.requested is not None and not spec.gates.allow_target_miss:
        # A missed budget is a failed job, not a quiet success (gates.allow_target_miss opts out).
        miss = abs(target.achieved - target.requested)
        out.append(GateResult(name="target", limit=target.tolerance, value=miss, passed=target.met))
    note = uneven_cut_note(prep.analysis, layers, target.achieved, spec.export.max_layer_cut)
    if note:
        prep.notes.append(note)
    accuracy = verified.accuracy
    if spec.gates.max_accuracy_drop is not None and accuracy is not None:
        out.append(
            GateResult(
                name="max_accuracy_drop",
                limit=spec.gates.max_accuracy_drop,
                value=accuracy.drop,
                passed=accuracy.drop <= spec.gates.max_accuracy_drop,
            )
        )
    speed_gate = latency_mod.min_speedup_gate(spec, verified.latencies, prep.notes)
    if speed_gate is not None:
        out.append(speed_gate)
    return out


def method_details(pruned: Pruned, recovered: Recovered) -> dict[str, Any]:
    details = dict(pruned.result.details)
    measured = recovered.measured
    details.update({k: v for k, v in measured.items() if k not in ("robustness", "dynamic")})
    details["recovery_loss_per_epoch"] = [round(v, 5) for v in recovered.curve]
    latency = pruned.ctx.latency
    if latency is not None or pruned.speed_checks:
        details["latency_widths"] = {
            **(latency.summary() if latency else {}),
            **pruned.speed_checks,
        }
    return details


def build_report(
    prep: Prepared,
    pruned: Pruned,
    recovered: Recovered,
    verified: Verified,
    tracker: Tracker,
    *,
    latency_threads: int | None = None,
) -> Report:
    """The report stage's numbers (nothing written): target, layers, gates, details."""
    spec, rec, loaded = prep.spec, prep.spec.recovery, prep.loaded
    target = achieved_target(prep, pruned, recovered, verified)
    layers = report_layers(prep, pruned, recovered.model, verified, latency_threads)
    job_gates = gates(prep, target, layers, verified)
    timings = tracker.finish()
    return Report(
        task=spec.task,
        method={
            "name": prep.info.name,
            "params": prep.params.model_dump(mode="json"),
            "paper": prep.info.paper,
        },
        recovery={
            **rec.model_dump(mode="json"),
            "mode_used": recovered.mode,
            "epochs_used": recovered.epochs if recovered.mode != "none" else 0,
            "distill_used": recovered.distill,
            "lr_used": recovered.lr,
            "lr_choice": recovered.lr_choice,
            "batch_size_used": pruned.ctx.batch_size,
        },
        target=target,
        macs=BeforeAfter(before=verified.cost_before.macs, after=verified.cost_after.macs),
        params=BeforeAfter(before=verified.cost_before.params, after=verified.cost_after.params),
        accuracy=verified.accuracy,
        evaluation=loaded.evaluation,
        metrics=verified.metrics,
        latency_ms=verified.latencies,
        file_bytes=BeforeAfter(before=len(verified.base_bytes), after=len(verified.pruned_bytes)),
        parity={
            "max_abs_diff": verified.max_abs_diff,
            "max_rel_diff": verified.max_rel_diff,
            "load_rel_diff": loaded.model.parity_rel,
        },
        layers=layers,
        excluded=[
            ExcludedLayer(name=n, reason=r, source=loaded.model.source_names.get(n))
            for n, r in prep.analysis.excluded
        ],
        gates=job_gates,
        method_details=method_details(pruned, recovered),
        robustness=recovered.measured.get("robustness"),
        dynamic=recovered.measured.get("dynamic"),
        stage_seconds=timings,
        notes=prep.notes,
        seed=spec.seed,
        model_sha256=loaded.model.sha256,
        spec_hash=spec.spec_hash(),
        versions=versions(),
        device=device_name(prep.device),
    )


def write_artifacts(
    report: Report,
    prep: Prepared,
    pruned: Pruned,
    recovered: Recovered,
    verified: Verified,
    out_dir: Path,
) -> None:
    """The method's extra files, model.onnx, model.pt2 and the report in three formats."""
    for name, payload in pruned.result.artifacts.items():
        export_mod.save_atomic(payload, out_dir / Path(name).name)
    export_mod.save_atomic(verified.pruned_bytes, out_dir / "model.onnx")
    report.notes.extend(
        torch_export.save_program(recovered.model, prep.example, out_dir / "model.pt2")
    )
    export_mod.save_atomic(report.model_dump_json(indent=2).encode(), out_dir / "report.json")
    export_mod.save_atomic(render_markdown(report).encode(), out_dir / "report.md")
    html = render_html(report, prep.public_analysis)
    export_mod.save_atomic(html.encode(), out_dir / "report.html")
