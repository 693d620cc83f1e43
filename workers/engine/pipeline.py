"""The engine pipeline: load → analyse → prune → recover → export → verify → report."""

from __future__ import annotations

import importlib
import math
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch

from prunery.html_report import render_html
from prunery.report import (
    AccuracyResult,
    BeforeAfter,
    ExcludedLayer,
    GateResult,
    LatencyResult,
    LayerRow,
    Report,
    TargetResult,
    render_markdown,
)
from prunery.spec import JobSpec
from workers import checks, datasets
from workers.engine import analysis as analysis_mod
from workers.engine import export as export_mod
from workers.engine import graph, heads, inputs, load, progressive, recovery, torch_export, train
from workers.engine import latency as latency_mod
from workers.engine.budget import BudgetUnreachable
from workers.engine.flops import onnx_costs, torch_costs
from workers.engine.method import MethodResult, PruneContext
from workers.engine.uneven import uneven_cut_note
from workers.errors import BadDataset, BadSpec, NotApplicable
from workers.methods import catalog

ProgressFn = Callable[[str, float, str | None], None]

# Share of the overall progress bar per stage (recovery dominates).
_STAGES = {
    "load": (0.00, 0.05),
    "analyse": (0.05, 0.12),
    "prune": (0.12, 0.35),
    "recover": (0.35, 0.85),
    "export": (0.85, 0.88),
    "verify": (0.88, 0.99),
    "report": (0.99, 1.00),
}
LATENCY_BATCHES = (1, 32)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in ("torch", "onnx", "onnxruntime", "onnx2torch", "torch-pruning", "onnxslim", "numpy"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    from prunery import __version__

    out["prunery"] = __version__
    return out


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _instantiate(spec: JobSpec):
    info = catalog.get_method(spec.method.name)
    params = catalog.validate_params(spec.method.name, spec.method.params)
    if spec.task not in info.tasks:
        raise NotApplicable(f"method {info.name!r} does not support task {spec.task!r} (supports {list(info.tasks)})")
    module_name, cls_name = info.implementation.split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return info, params, cls(params)


def _dynamic_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose graph input/output batch dims are symbolic (for batch-32 timing)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name for t in m.graph.initializer}
    for vi in list(m.graph.input) + list(m.graph.output):
        if vi.name in inits:
            continue
        dims = vi.type.tensor_type.shape.dim
        if len(dims):
            dims[0].ClearField("dim_value")
            dims[0].dim_param = "batch"
    return m


def _timing_baseline(loaded, x32: np.ndarray, opset: int) -> bytes:
    """The original as verify times it (dynamic batch), built before pruning for latency search."""
    base = _dynamic_batch(loaded.onnx_model).SerializeToString()
    try:
        load.ort_session(base).run(None, {loaded.input_name: x32})
        return base
    except Exception:
        return export_mod.export_onnx(loaded.module, torch.from_numpy(x32[:1]), opset,
                                      input_name=loaded.input_name).SerializeToString()


def _width(module: torch.nn.Module | None) -> int:
    if module is None:
        return 0
    if hasattr(module, "out_channels"):
        return int(module.out_channels)
    if hasattr(module, "out_features"):
        return int(module.out_features)
    children = [m for m in module.modules() if hasattr(m, "out_features") or hasattr(m, "out_channels")]
    return _width(children[-1]) if children else 0


def _layer_rows(original: torch.nn.Module, pruned: torch.nn.Module, macs_before: dict[str, int], macs_after: dict[str, int]) -> list[LayerRow]:
    """Per Conv/Linear layer of the original: output width and MACs before → after. A layer
    the method replaced by several (a factorised Linear) is summed under its old name."""
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
        rows.append(LayerRow(
            name=name, op=op, channels_before=_width(mod), channels_after=_width(new),
            macs_before=int(macs_before.get(name, 0)), macs_after=int(after),
        ))
    return rows


def run(
    spec: JobSpec,
    model_path: Path | str,
    data_path: Path | str,
    out_dir: Path | str,
    progress: ProgressFn | None = None,
    *,
    device: str | None = None,
    max_model_bytes: int = checks.DEFAULT_MAX_MODEL_BYTES,
    latency_runs: int = 30,
    latency_threads: int | None = None,
    eval_data_path: Path | str | None = None,
) -> Report:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    notes: list[str] = []
    state = {"stage": "load", "t0": time.perf_counter()}

    def report_progress(stage: str, fraction: float, message: str | None = None) -> None:
        lo, hi = _STAGES[stage]
        if progress is not None:
            progress(stage, lo + (hi - lo) * min(max(fraction, 0.0), 1.0), message)

    def begin(stage: str) -> None:
        now = time.perf_counter()
        timings[state["stage"]] = round(timings.get(state["stage"], 0.0) + now - state["t0"], 3)
        state.update(stage=stage, t0=now)
        report_progress(stage, 0.0, f"{stage}…")

    torch.manual_seed(spec.seed)
    np.random.seed(spec.seed % 2**32)
    dev = train.pick_device(device)
    report_progress("load", 0.0, "checking the spec")
    lm = spec.task == "language_modeling"
    if lm and spec.gates.max_accuracy_drop is not None:
        raise BadSpec("gates.max_accuracy_drop applies to classification; language models report bits per token and perplexity")
    info, params, method = _instantiate(spec)

    # ---------------------------------------------------------------- load
    ds = datasets.load_dataset(
        data_path, task=spec.task, split=spec.data.split, seed=spec.seed,
        image_size=spec.data.image_size, grayscale=spec.data.grayscale, mean=spec.data.mean, std=spec.data.std,
    )
    ds, evaluation = inputs.with_evaluation_set(ds, eval_data_path, spec.task, spec.data, spec.seed)
    report_progress("load", 0.3, f"dataset: {len(ds.x_train)} train / {len(ds.x_test)} evaluation samples ({evaluation['dataset']})")
    vocab = ds.vocab_size if lm else None
    loaded = load.load(Path(model_path), ds.sample_shape, max_bytes=max_model_bytes, seed=spec.seed, input_high=vocab)
    catalog.check_applicable(spec.method.name, checks.summarize(loaded.onnx_model, loaded.file_bytes), spec.task)
    notes.extend(loaded.notes)
    ds, cast_note = inputs.float_images(ds, loaded.input_dtype, spec.data)
    notes.extend([cast_note] if cast_note else [])
    data = train.TensorData.from_numpy(ds)
    if data.x_train.dtype != torch.float32 and data.x_train.is_floating_point():
        data.x_train, data.x_test = data.x_train.float(), data.x_test.float()
    example = data.x_train[:1].clone()
    with torch.no_grad():
        out = loaded.module(example)
    if lm:
        if out.dim() != 3 or out.shape[1] != example.shape[1]:
            raise BadDataset(f"language modelling needs logits of shape [batch, tokens, vocab]; the model outputs {list(out.shape)}")
        if out.shape[2] < vocab:
            raise BadDataset(f"the token ids go up to {vocab - 1} but the model's vocabulary has {out.shape[2]} entries")
    elif out.dim() != 2:
        raise BadDataset(f"classification needs logits of shape [batch, classes]; the model outputs {list(out.shape)}")
    elif out.shape[1] < ds.num_classes:
        raise BadDataset(
            f"the labels go up to class {ds.num_classes - 1} but the model outputs {out.shape[1]} classes; "
            "check that the dataset belongs to this model"
        )
    report_progress("load", 1.0, f"converted; torch vs onnxruntime relative error {loaded.parity_rel:.1e}")

    # ---------------------------------------------------------------- analyse
    begin("analyse")
    gen = torch.Generator().manual_seed(spec.seed)
    calib_idx = torch.randperm(len(data.x_train), generator=gen)[:256]
    calibration = data.x_train[calib_idx]
    analysis = graph.analyse(
        loaded.module, example, calibration[:16], round_to=spec.export.round_to, seed=spec.seed,
        progress=lambda f, m=None: report_progress("analyse", f, m),
    )
    analysis.lifted = loaded.lifted
    if getattr(method, "prunes_heads", False):  # whole attention heads (heads.py)
        head_groups, head_excluded = heads.analyse(loaded.module, example, calibration[:16], spec.seed)
        analysis.groups.extend(head_groups)
        analysis.excluded.extend(head_excluded)
    # Written before pruning, so a job that fails with budget_unreachable still has it.
    public_analysis = analysis_mod.summarize(
        loaded.module, example, analysis, checks.summarize(loaded.onnx_model, loaded.file_bytes),
        spec.task, spec.export.round_to,
    )
    export_mod.save_atomic(public_analysis.model_dump_json(indent=2).encode(), out_dir / "analysis.json")
    if not analysis.groups:
        reasons = "; ".join(f"{n}: {r}" for n, r in analysis.excluded[:5])
        raise BudgetUnreachable(f"no layer of this model can be pruned safely ({reasons})")
    base_costs = torch_costs(loaded.module, example)
    report_progress("analyse", 1.0, f"{len(analysis.groups)} prunable groups, {len(analysis.excluded)} excluded")

    # ---------------------------------------------------------------- prune
    begin("prune")
    ctx = PruneContext(
        spec=spec, model=loaded.module, example=example, calibration=calibration, data=data,
        analysis=analysis, base_costs=base_costs, device=dev, seed=spec.seed,
        progress=lambda f, m: report_progress("prune", f, m),
    )
    latency_mod.attach(
        ctx, _timing_baseline(loaded, data.x_test[:32].numpy(), spec.export.opset), loaded.input_name,
        data.x_test[:32].numpy(), latency_threads, lambda f, m: report_progress("prune", f, m),
    )
    result: MethodResult = progressive.run(method, ctx, info.name)
    speed_checks: dict = {}
    if ctx.latency is not None and not result.dynamic and spec.target.kind != "layers":
        result, speed_checks = latency_mod.ensure_faster(
            ctx.latency, ctx.latency_timer, lambda: method.run(ctx), result, lambda r: r.model.cpu().eval(),
            LATENCY_BATCHES, notes, lambda f, m: report_progress("prune", f, m),
            meets_target=lambda r: latency_mod.meets_budget(spec.target, torch_costs(r.model.cpu().eval(), example), base_costs),
            floor_ms=spec.gates.min_speedup_floor_ms,
        )
    pruned = result.model.cpu().eval()
    notes.extend(result.notes)
    pruned_costs = torch_costs(pruned, example)

    # ---------------------------------------------------------------- recover
    begin("recover")
    rec = spec.recovery
    mode = "scratch" if result.recovery == "scratch" and rec.mode != "none" else rec.mode
    epochs: float = rec.epochs if result.recovery_epochs is None else result.recovery_epochs
    if mode == "scratch":
        if rec.epochs_mode == "B":
            epochs = int(math.ceil(rec.epochs * base_costs.macs / max(pruned_costs.macs, 1)))
        train.reinitialize(pruned, spec.seed)
    curve: list[float] = []
    kd = recovery.distillation(spec, result.distill) if mode != "none" else None
    extra = recovery.combine(recovery.distill_loss(loaded.module, kd, dev), result.recovery_extra_loss)
    if kd:
        notes.append(f"recovery distilled from the original model's logits (alpha {kd['alpha']}, T {kd['temperature']}, from {kd['source']})")
    if mode != "none" and epochs > 0:
        curve = recovery.train_epochs(
            ctx, pruned, epochs, lr=rec.lr, extra_loss=extra,
            on_step=lambda s, total, loss: report_progress("recover", s / total, f"epoch {1 + int((s - 1) * math.ceil(epochs) // total)}/{math.ceil(epochs)} loss {loss:.4f}"),
        )
    pruned = pruned.cpu().eval()
    measured: dict = {}
    if result.post_recovery is not None:
        measured = dict(result.post_recovery(loaded.module, pruned, data))
        pruned = pruned.cpu().eval()

    # ---------------------------------------------------------------- export
    begin("export")
    pruned_onnx = export_mod.export_onnx(pruned, example, spec.export.opset, input_name=loaded.input_name)
    pruned_bytes = pruned_onnx.SerializeToString()
    base_onnx = _dynamic_batch(loaded.onnx_model)
    base_bytes = base_onnx.SerializeToString()
    try:
        load.ort_session(base_bytes).run(None, {loaded.input_name: data.x_test[:32].numpy()})
    except Exception:
        notes.append("the uploaded graph has a fixed batch size; the baseline was re-exported with a dynamic batch for timing")
        base_onnx = export_mod.export_onnx(loaded.module, example, spec.export.opset, input_name=loaded.input_name)
        base_bytes = base_onnx.SerializeToString()

    # ---------------------------------------------------------------- verify
    begin("verify")
    session = load.ort_session(pruned_bytes)
    worst_diff, worst_rel = 0.0, 0.0
    probes = [data.x_test[:64].numpy()] + [
        load.random_input([4, *ds.sample_shape], loaded.input_dtype, spec.seed + k, vocab) for k in range(2)
    ]
    for x in probes:
        diff, rel = load.parity(pruned, session, loaded.input_name, x)
        worst_diff, worst_rel = max(worst_diff, diff), max(worst_rel, rel)
    if not worst_rel <= load.PARITY_RTOL:
        raise export_mod.ExportFailed(
            f"the exported pruned model disagrees with torch (relative error {worst_rel:.2e}); not publishing it"
        )
    report_progress("verify", 0.2, "counting MACs and parameters on the ONNX graphs")
    feed1 = {loaded.input_name: data.x_test[:1].numpy()}
    cost_before = onnx_costs(base_onnx, feed1)
    cost_after = onnx_costs(pruned_onnx, feed1)
    report_progress("verify", 0.4, "accuracy on the test split (onnxruntime)")
    y = data.y_test.numpy()
    x_test = data.x_test.numpy()
    logits_before = export_mod.onnx_predict(base_bytes, loaded.input_name, x_test)
    logits_after = export_mod.onnx_predict(pruned_bytes, loaded.input_name, x_test)
    metrics: dict[str, BeforeAfter] = {}
    accuracy: AccuracyResult | None = None
    if lm:
        lb, la = export_mod.lm_metrics(logits_before, y), export_mod.lm_metrics(logits_after, y)
        metrics = {k: BeforeAfter(before=lb[k], after=la[k]) for k in lb}
    else:
        acc_b, acc_a = export_mod.topk_accuracy(logits_before, y, 1), export_mod.topk_accuracy(logits_after, y, 1)
        top5 = logits_before.shape[1] >= 5
        accuracy = AccuracyResult(
            before=acc_b, after=acc_a, drop=(acc_b - acc_a) * 100.0,
            top5_before=export_mod.topk_accuracy(logits_before, y, 5) if top5 else None,
            top5_after=export_mod.topk_accuracy(logits_after, y, 5) if top5 else None,
            samples=len(y),
            measured_with=f"onnxruntime on the exported ONNX, {evaluation['dataset']}",
        )
    latencies: list[LatencyResult] = []
    batches = sorted({*LATENCY_BATCHES, spec.target.latency_batch if spec.target.kind == "latency" else 1})
    for i, bs in enumerate(batches):
        report_progress("verify", 0.6 + 0.35 * i / len(batches), f"latency at batch {bs}")
        before, after = export_mod.interleaved_latency(
            base_bytes, pruned_bytes, loaded.input_name, loaded.input_name, x_test[:bs], bs,
            runs=latency_runs, threads=latency_threads,
        )
        before, after = latency_mod.confirm_if_slow(
            spec, before, after, notes, lambda r, bs=bs: export_mod.interleaved_latency(
                base_bytes, pruned_bytes, loaded.input_name, loaded.input_name, x_test[:bs], bs,
                runs=r, threads=latency_threads,
            ),
        )
        latencies.append(LatencyResult(
            batch_size=bs, before=round(before.median_ms, 4), after=round(after.median_ms, 4),
            speedup=round(before.median_ms / after.median_ms, 3) if after.median_ms else float("nan"),
            runs=before.runs, p90_before=round(before.p90_ms, 4), p90_after=round(after.p90_ms, 4),
        ))

    # ---------------------------------------------------------------- report
    begin("report")
    target = spec.target
    measured_on = "exported ONNX graphs"
    if target.kind == "params":
        achieved = cost_after.params / cost_before.params
    elif target.kind == "latency":
        lat_b = next(lat for lat in latencies if lat.batch_size == target.latency_batch)
        achieved = lat_b.after / lat_b.before
        measured_on = (
            f"onnxruntime CPU latency of the exported ONNX at batch {lat_b.batch_size}, median of {lat_b.runs} "
            "runs interleaved with the original, measured in verify independently of the search"
        )
    elif result.dynamic and measured.get("dynamic", {}).get("macs_mean") is not None:
        achieved = float(measured["dynamic"]["macs_mean"]) / cost_before.macs
        notes.append("dynamic model: the achieved MACs are the measured mean over the evaluation set; "
                     "`macs.after` is the static count of the exported graph")
    else:
        achieved = cost_after.macs / cost_before.macs
    requested = target.fraction
    met = requested is None or abs(achieved - requested) <= target.tolerance
    if not met:
        notes.append(
            f"achieved {achieved:.4f} of the original {latency_mod.metric_words(target.kind)} "
            f"versus {requested} requested: the nearest reachable width (round_to={spec.export.round_to}) is outside the tolerance"
        )
    after_costs = torch_costs(pruned, example)
    odd = [n for n, m in pruned.named_modules() if isinstance(m, torch.nn.Conv2d) and m.groups == 1 and m.out_channels % 8]
    if odd and any(lat.speedup < 1.0 for lat in latencies):
        notes.append(
            f"{len(odd)} pruned conv layers have widths that are not multiples of 8, which fall off "
            "onnxruntime's blocked (NCHWc) convolution kernels on CPU; export.round_to = 8 usually "
            "turns that into a real speedup"
        )
    layers = _layer_rows(loaded.module, pruned, base_costs.per_layer, after_costs.per_layer)
    layers.extend(heads.report_rows(loaded.module, pruned))
    how = latency_mod.annotate_layers(
        layers, loaded.module, pruned, example, ctx.latency.timer if ctx.latency else None, latency_threads
    )
    if how:
        notes.append(how)
    gates: list[GateResult] = []
    if requested is not None and not spec.gates.allow_target_miss:
        # A missed budget is a failed job, not a quiet success (gates.allow_target_miss opts out).
        gates.append(GateResult(name="target", limit=target.tolerance, value=abs(achieved - requested), passed=met))
    note = uneven_cut_note(analysis, layers, achieved, spec.export.max_layer_cut)
    if note:
        notes.append(note)
    if spec.gates.max_accuracy_drop is not None and accuracy is not None:
        gates.append(GateResult(
            name="max_accuracy_drop", limit=spec.gates.max_accuracy_drop, value=accuracy.drop,
            passed=accuracy.drop <= spec.gates.max_accuracy_drop,
        ))
    speed_gate = latency_mod.min_speedup_gate(spec, latencies, notes)
    if speed_gate is not None:
        gates.append(speed_gate)
    timings[state["stage"]] = round(timings.get(state["stage"], 0.0) + time.perf_counter() - state["t0"], 3)
    details = dict(result.details)
    details.update({k: v for k, v in measured.items() if k not in ("robustness", "dynamic")})
    details["recovery_loss_per_epoch"] = [round(v, 5) for v in curve]
    if ctx.latency is not None or speed_checks:
        details["latency_widths"] = {**(ctx.latency.summary() if ctx.latency else {}), **speed_checks}
    report = Report(
        task=spec.task,
        method={"name": info.name, "params": params.model_dump(mode="json"), "paper": info.paper},
        recovery={**rec.model_dump(mode="json"), "mode_used": mode, "epochs_used": epochs if mode != "none" else 0, "distill_used": kd},
        target=TargetResult(
            kind=target.kind, requested=requested, achieved=round(achieved, 6),
            tolerance=target.tolerance, met=met, measured_on=measured_on,
        ),
        macs=BeforeAfter(before=cost_before.macs, after=cost_after.macs),
        params=BeforeAfter(before=cost_before.params, after=cost_after.params),
        accuracy=accuracy,
        evaluation=evaluation,
        metrics=metrics,
        latency_ms=latencies,
        file_bytes=BeforeAfter(before=len(base_bytes), after=len(pruned_bytes)),
        parity={"max_abs_diff": worst_diff, "max_rel_diff": worst_rel, "load_rel_diff": loaded.parity_rel},
        layers=layers,
        excluded=[ExcludedLayer(name=n, reason=r) for n, r in analysis.excluded],
        gates=gates,
        method_details=details,
        robustness=measured.get("robustness"),
        dynamic=measured.get("dynamic"),
        stage_seconds=timings,
        notes=notes,
        seed=spec.seed,
        model_sha256=loaded.sha256,
        spec_hash=spec.spec_hash(),
        versions=_versions(),
        device=_device_name(dev),
    )
    for name, payload in result.artifacts.items():
        export_mod.save_atomic(payload, out_dir / Path(name).name)
    export_mod.save_atomic(pruned_bytes, out_dir / "model.onnx")
    report.notes.extend(torch_export.save_program(pruned, example, out_dir / "model.pt2"))
    export_mod.save_atomic(report.model_dump_json(indent=2).encode(), out_dir / "report.json")
    export_mod.save_atomic(render_markdown(report).encode(), out_dir / "report.md")
    export_mod.save_atomic(render_html(report, public_analysis).encode(), out_dir / "report.html")
    report_progress("report", 1.0, "done")
    return report

