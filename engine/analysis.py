"""Analyse before pruning: which channel groups can go, what they cost, how far a budget can
reach and which methods apply — the `load` and `analyse` stages of the pipeline only, so it
takes seconds, not a training run.

    prunery analyze MODEL.onnx [--data DATA.npz] [--round-to 8] [--json] [--out analysis.json]

`summarize()` turns the pipeline's own `graph.Analysis` into the `prunery.analysis.Analysis`
that every job also writes as `analysis.json` (before it prunes, so a job that fails with
`budget_unreachable` still has it).

`analyze()` also estimates a job's wall time for a spec: `measure_step_costs()` times one
training step, one evaluation batch, one ONNX export and onnxruntime forwards on this
machine, and `estimate_time()` multiplies them by the spec's epochs, steps per epoch and the
method's own passes (`_method_passes`, each with the assumption it makes).

Over 400 lines on purpose: the estimate times the very model and calibration samples that
`analyze()` has just loaded, and it is one answer of `prunery analyze` with the analysis.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core.errors import BadSpec, EngineError
from core.validation import onnx_checks as checks
from engine import graph
from engine.budget import _chunks_for_group
from engine.flops import torch_costs
from engine.method import MethodCatalog
from prunery.analysis import (
    Analysis,
    ExcludedGroup,
    GroupLayer,
    MethodApplicability,
    PrunableGroup,
    StepCosts,
    TimeEstimate,
)
from prunery.spec import JobSpec, Target

MAX_LAYER_RATIO = 0.9  # the budget allocator's default: no group loses more than 90%


def _own_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=False))


def methods_for(
    summary: checks.ModelSummary, task: str, catalog: MethodCatalog
) -> list[MethodApplicability]:
    out = []
    for info in catalog.list_methods():
        try:
            catalog.check_applicable(info.name, summary, task)
            out.append(MethodApplicability(name=info.name, applies=True))
        except EngineError as exc:
            out.append(MethodApplicability(name=info.name, applies=False, reason=exc.message))
    return out


def summarize(
    module: nn.Module,
    example: torch.Tensor,
    analysis: graph.Analysis,
    summary: checks.ModelSummary,
    task: str,
    round_to: int | None = 1,
    notes: list[str] | None = None,
    *,
    catalog: MethodCatalog,
) -> Analysis:
    """The public analysis of a converted model and its `graph.analyse` result."""
    notes = list(notes or [])
    base = torch_costs(module, example)
    modules = dict(module.named_modules())
    macs_total, params_total = max(base.macs, 1), max(base.params, 1)
    groups: list[PrunableGroup] = []
    plan: dict[str, list[int]] = {}
    touched: set[str] = set()
    for g in analysis.groups:
        removable = [
            i
            for chunk in _chunks_for_group(
                g, list(range(g.channels)), max(1, round_to or 1), MAX_LAYER_RATIO
            )
            for i in chunk
        ]
        if removable:
            plan[g.name] = removable
        names = {m.name for m in g.members}
        touched |= names
        macs = sum(base.per_layer.get(n, 0) for n in names)
        params = sum(_own_params(modules[n]) for n in names if n in modules)
        groups.append(
            PrunableGroup(
                name=g.name,
                channels=g.channels,
                min_channels=g.channels - len(removable),
                layers=[GroupLayer(name=m.name, op=m.op, role=m.role) for m in g.members],
                macs=int(macs),
                params=int(params),
                macs_share=round(macs / macs_total, 6),
                params_share=round(params / params_total, 6),
            )
        )
    min_macs, min_params = 1.0, 1.0
    if plan:
        try:
            smallest = graph.prune_copy(module, example, plan)
            costs = torch_costs(smallest, example)
            min_macs, min_params = costs.macs / macs_total, costs.params / params_total
        except Exception as exc:  # the groups were proven one by one; say so if all together fail
            notes.append(
                f"pruning every group to its minimum at once failed ({type(exc).__name__}: {exc}); "
                "the smallest reachable fractions are unknown"
            )
    prunable_macs = sum(v for k, v in base.per_layer.items() if k in touched)
    if analysis.lifted:
        notes.append(
            f"{len(analysis.lifted)} MatMul+Add pairs were lifted into Linear layers so they can be pruned"
        )
    return Analysis(
        task=task,
        input_shape=[int(d) for d in example.shape],
        macs=base.macs,
        params=base.params,
        round_to=round_to,
        groups=groups,
        excluded=[ExcludedGroup(name=n, reason=r) for n, r in analysis.excluded],
        prunable_macs_share=round(prunable_macs / macs_total, 6),
        min_macs_fraction=round(min_macs, 6),
        min_params_fraction=round(min_params, 6),
        methods=methods_for(summary, task, catalog),
        notes=notes,
    )


def analyze(
    model_path: Path | str,
    data_path: Path | str | None = None,
    *,
    task: str = "classification",
    round_to: int = 1,
    seed: int = 0,
    max_model_bytes: int = checks.DEFAULT_MAX_MODEL_BYTES,
    progress: Callable[[float], None] | None = None,
    catalog: MethodCatalog,
    spec: JobSpec | None = None,
    estimate: bool = True,
) -> Analysis:
    """Load (check, convert, prove the conversion) and analyse one model. Without data the
    sample shape comes from the model's declared input, and the probes use random inputs.
    With `estimate`, also the job-time estimate for `spec` (default: `default_spec()`)."""
    from core.validation import datasets
    from engine import load

    t0 = time.perf_counter()
    if round_to < 1:
        raise BadSpec("round_to must be at least 1")
    model_path = Path(model_path)
    torch.manual_seed(seed)
    notes: list[str] = []
    vocab = None
    counts: tuple[int | None, int | None] = (None, None)
    if data_path is not None:
        ds = datasets.load_dataset(data_path, task=task, seed=seed)
        sample_shape = tuple(ds.sample_shape)
        vocab = ds.vocab_size if task == "language_modeling" else None
        x = torch.as_tensor(ds.x_train)
        if x.is_floating_point():
            x = x.float()
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:16]
        calibration = x[idx]
        counts = (len(ds.x_train), len(ds.x_test))
    else:
        checked = checks.load_checked(model_path, max_bytes=max_model_bytes)
        inits = {t.name for t in checked.graph.initializer}
        inputs = [i for i in checked.graph.input if i.name not in inits]
        dims = checks._shape(inputs[0]) if len(inputs) == 1 else []
        sample = dims[1:]
        if len(inputs) == 1 and not all(isinstance(d, int) and d > 0 for d in sample):
            raise BadSpec(
                f"the model's input {inputs[0].name!r} has shape {dims}: the sample dimensions are not fixed, "
                "so pass --data (a dataset) to give the sample shape"
            )
        sample_shape = tuple(d for d in sample if isinstance(d, int))  # all fixed (checked)
        calibration = None
        notes.append("no dataset given: the zero-equivalence probes ran on random inputs")
    loaded = load.load(
        model_path, sample_shape, max_bytes=max_model_bytes, seed=seed, input_high=vocab
    )
    notes.extend(loaded.notes)
    if calibration is None:
        calibration = torch.from_numpy(
            load.random_input([16, *sample_shape], loaded.input_dtype, seed, vocab)
        )
    example = calibration[:1].clone()
    result = graph.analyse(
        loaded.module, example, calibration, round_to=round_to, seed=seed, progress=progress
    )
    result.lifted = loaded.lifted
    summary = checks.summarize(loaded.onnx_model, loaded.file_bytes)
    out = summarize(loaded.module, example, result, summary, task, round_to, notes, catalog=catalog)
    out.seconds = round(time.perf_counter() - t0, 3)
    if estimate:
        out.time_estimate = _estimate(loaded.module, calibration, spec, counts, out, catalog)
    return out


def _estimate(
    module: nn.Module,
    calibration: torch.Tensor,
    spec: JobSpec | None,
    counts: tuple[int | None, int | None],
    analysed: Analysis,
    catalog: MethodCatalog,
) -> TimeEstimate:
    spec = spec or default_spec()
    costs, measuring = measure_step_costs(
        module, calibration, spec.recovery.batch_for(counts[0]), opset=spec.export.opset
    )
    out = estimate_time(
        costs,
        spec,
        train_samples=counts[0],
        test_samples=counts[1],
        analysis_seconds=analysed.seconds,
        catalog=catalog,
    )
    out.assumptions += measuring
    return out


# ------------------------------------------------------------------ job-time estimate

MEASURE_BATCH_CAP = 256  # larger recovery batches are timed at this size and scaled linearly
LATENCY_RUNS = 30  # verify.measure_latency's default interleaved runs per batch size
LATENCY_BATCHES = (1, 32)  # engine.stages.LATENCY_BATCHES (batch sizes verify times)


def _mean_seconds(fn: Callable[[], Any], repeats: int, sync: Callable[[], None]) -> float:
    """Mean wall time of `repeats` calls after two warm-up calls (allocator, kernels,
    optimizer state). The mean, not the median: a job's time is the sum of its steps, and a
    busy machine's slow steps count in it."""
    for _ in range(2):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeats


def _torch_steps(module: nn.Module, x: torch.Tensor, device: torch.device) -> tuple[float, float]:
    """(one optimizer step, one no-grad forward) on batch `x`, mean of 5 after a warm-up.
    The loss is the mean square of the outputs: the task's loss costs the same backward."""
    model = copy.deepcopy(module).to(device).train()
    x = x.to(device)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-6)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def train_step() -> None:
        out = model(x)
        out = out[0] if isinstance(out, (tuple, list)) else out
        opt.zero_grad(set_to_none=True)
        out.float().square().mean().backward()
        opt.step()

    def eval_batch() -> None:
        with torch.no_grad():
            model(x)

    step = _mean_seconds(train_step, 5, sync)
    model.eval()
    return step, _mean_seconds(eval_batch, 5, sync)


def measure_step_costs(
    module: nn.Module,
    calibration: torch.Tensor,
    batch_size: int,
    *,
    opset: int = 17,
    device: torch.device | None = None,
) -> tuple[StepCosts, list[str]]:
    """Time one training step and one evaluation batch (torch, at `batch_size`, built from
    the calibration samples), one ONNX export and onnxruntime forwards at the batch sizes
    verify times. Returns the costs and the assumptions the measuring made."""
    from engine import export as export_mod
    from engine import train as train_mod
    from engine.load import ort_session

    device = device or train_mod.pick_device()
    notes: list[str] = []
    timed_bs = min(batch_size, MEASURE_BATCH_CAP)
    x = calibration[torch.arange(timed_bs) % len(calibration)]
    step, forward = _torch_steps(module, x, device)
    if timed_bs < batch_size:
        step, forward = step * batch_size / timed_bs, forward * batch_size / timed_bs
        notes.append(
            f"steps were timed at batch {timed_bs} and scaled linearly to batch {batch_size}"
        )
    export_s: float | None = None
    ort: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        exported = export_mod.export_onnx(copy.deepcopy(module).cpu().eval(), x[:1].cpu(), opset)
        export_s = time.perf_counter() - t0
        session = ort_session(exported, threads=export_mod.timing_threads(None))
        name = session.get_inputs()[0].name
        for bs in sorted({*LATENCY_BATCHES, min(batch_size, 256)}):
            feed = {
                name: np.ascontiguousarray(
                    calibration[torch.arange(bs) % len(calibration)].cpu().numpy()
                )
            }
            ort[str(bs)] = _mean_seconds(partial(session.run, None, feed), 5, lambda: None)
    except Exception as exc:  # the estimate goes on without the export and verify parts
        notes.append(
            f"the export or onnxruntime timing failed ({type(exc).__name__}); export and verify are not counted"
        )
    costs = StepCosts(
        device=str(device),
        batch_size=batch_size,
        train_step_seconds=round(step, 6),
        eval_batch_seconds=round(forward, 6),
        export_seconds=round(export_s, 4) if export_s is not None else None,
        ort_batch_seconds={k: round(v, 6) for k, v in ort.items()},
    )
    return costs, notes


def _method_passes(
    name: str, params: Any, steps: int, batch_size: int, test_batches: int, catalog: MethodCatalog
) -> tuple[float, float, float, list[str]]:
    """The method's own passes beyond recovery: (training steps, evaluation batches, factor
    on recovery steps, assumptions). Steps are at the recovery batch size."""

    def p(key: str, default: float) -> float:
        return float(getattr(params, key, default))

    if name in ("l1_norm", "random", "svd"):
        return 0.0, 0.0, 1.0, [f"{name} scores channels from the weights: no passes over the data"]
    if name in ("thinet", "channel_regression"):
        return 0.0, 0.0, 1.0, [f"{name}'s forward passes over calibration samples are not counted"]
    if name == "taylor":
        n = p("batches", 10) * p("batch_size", 64) / batch_size
        return n, 0.0, 1.0, ["taylor: one forward+backward per scoring mini-batch"]
    per_epoch = {
        "network_slimming": ("sparsity_epochs", 1.0, "sparsity training"),
        "pruning_from_scratch": ("gate_epochs", 1.0, "gate learning, counted as full steps"),
        "tas": ("search_epochs", 2.0, "search: one weight and one architecture step per batch"),
        "flop": ("epochs", 1.0, "L0 training"),
        "sanp": ("epochs", 1.0, "joint training"),
    }
    if name in per_epoch:
        key, factor, what = per_epoch[name]
        epochs = p(key, 1)
        return factor * epochs * steps, 0.0, 1.0, [f"{name}: {epochs:g} epochs of {what}"]
    if name == "anp":
        k = 1 + p("pgd_steps", 1)
        train_steps = p("mask_epochs", 1) * steps * k + 2 * test_batches * p("eval_pgd_steps", 10)
        return (
            train_steps,
            0.0,
            k,
            [
                f"anp: every mask-training and recovery step runs {k - 1:g} PGD steps (each a "
                "forward+backward); the robustness evaluation attacks both models on the test split"
            ],
        )
    if name == "auto":
        share = 1 - p("validation_fraction", 0.15)
        screen = p("screen_epochs", 1.0) * steps * share
        train_steps, eval_batches = 0.0, 0.0
        notes = [
            f"auto screens {len(params.candidates)} candidates: each pruned, recovered "
            f"{p('screen_epochs', 1.0):g} epoch(s) and evaluated on the validation split"
        ]
        for cand in params.candidates:
            sub = _method_passes(
                cand, catalog.validate_params(cand, {}), steps, batch_size, test_batches, catalog
            )
            train_steps += sub[0] + screen * sub[2]
            eval_batches += sub[1] + (1 - share) * steps
            notes += sub[3]
        return train_steps, eval_batches, 1.0, notes
    return 0.0, 0.0, 1.0, [f"no known extra passes for {name}: only recovery is counted"]


def estimate_time(
    costs: StepCosts,
    spec: JobSpec,
    *,
    train_samples: int | None,
    test_samples: int | None,
    analysis_seconds: float,
    catalog: MethodCatalog,
) -> TimeEstimate:
    """Job wall time for `spec` from measured step costs (see the returned formula)."""
    rec, bs = spec.recovery, costs.batch_size
    steps = math.ceil(train_samples / bs) if train_samples else 0
    test_batches = math.ceil(test_samples / bs) if test_samples else 0
    params = catalog.validate_params(spec.method.name, spec.method.params)
    m_train, m_eval, factor, assumptions = _method_passes(
        spec.method.name, params, steps, bs, test_batches, catalog
    )
    epochs = rec.epochs if rec.mode != "none" else 0
    teacher = costs.eval_batch_seconds if rec.mode == "finetune" and rec.distill.enabled else 0.0
    # recovery.lr null: each of lr_choices first trains lr_screen_epochs (null: all of the
    # epochs) on 85% of the data, then the winner fine-tunes on all of it.
    choosing = rec.mode == "finetune" and epochs > 0 and rec.choosing_lr()
    n_choices = len(set(rec.lr_choices)) if choosing else 0
    screen = rec.lr_screen_for(epochs)
    trained = epochs + n_choices * screen * 0.85
    parts = {
        "analysis": analysis_seconds,
        "method": m_train * costs.train_step_seconds + m_eval * costs.eval_batch_seconds,
        "recovery": trained * steps * factor * (costs.train_step_seconds + teacher),
    }
    ort = costs.ort_batch_seconds
    big = str(min(bs, 256))
    if big in ort and all(str(b) in ort for b in LATENCY_BATCHES):
        accuracy = 2 * (test_samples or 0) * ort[big] / int(big)
        parts["verify"] = accuracy + 2 * LATENCY_RUNS * sum(ort[str(b)] for b in LATENCY_BATCHES)
    if costs.export_seconds is not None:
        parts["export"] = costs.export_seconds
    assumptions = [
        "recovery steps cost one measured training step"
        + (" plus one teacher forward (distillation)" if teacher else ""),
        "verify evaluates the original and the pruned ONNX on the test split and times both "
        f"{LATENCY_RUNS} times at batch sizes {', '.join(map(str, LATENCY_BATCHES))}; the pruned "
        "model is timed as if it were the original (an upper bound)",
        "not counted: per-layer width timing (export.round_to null), latency-target searches, "
        "model.pt2, the queue wait",
        *assumptions,
    ]
    if choosing:
        assumptions.append(
            f"recovery.lr null: {n_choices} learning rates each train {screen:g} epoch(s) on 85% "
            "of the training split, then the winner fine-tunes on all of it"
        )
    if rec.mode == "scratch" and rec.epochs_mode == "B":
        assumptions.append("epochs_mode B scales the epochs by MACs_full/MACs_pruned: counted as E")
    known = train_samples is not None and test_samples is not None
    return TimeEstimate(
        method=spec.method.name,
        epochs=epochs,
        batch_size=bs,
        train_samples=train_samples,
        test_samples=test_samples,
        steps_per_epoch=steps if train_samples is not None else None,
        measured=costs,
        parts={k: round(v, 3) for k, v in parts.items()},
        total_seconds=round(sum(parts.values()), 3) if known else None,
        formula="analysis + method_train_steps x train_step + method_eval_batches x eval_batch "
        "+ epochs x steps_per_epoch x method_factor x (train_step [+ eval_batch when distilling]) "
        f"+ 2 x test_samples x ort(batch {big}) / {big} + 2 x {LATENCY_RUNS} x sum(ort(batch b) "
        f"for b in {list(LATENCY_BATCHES)}) + export; here method_train_steps = {m_train:g}, "
        f"method_eval_batches = {m_eval:g}, method_factor = {factor:g}",
        assumptions=assumptions,
    )


def default_spec() -> JobSpec:
    """The spec a job gets when only the target is given (the estimate's default)."""
    return JobSpec(target=Target(flops=0.5))
