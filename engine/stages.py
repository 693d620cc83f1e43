"""The pipeline's middle stages: prune (the method, then the never-slower re-choosing) and
recover (fine-tune, scratch, distillation)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from engine import export as export_mod
from engine import latency as latency_mod
from engine import load, progressive, recovery, train
from engine.flops import Costs, torch_costs
from engine.method import MethodResult, PruneContext
from engine.prepare import Prepared, dynamic_batch
from engine.tracker import StageProgress

LATENCY_BATCHES = (1, 32)


@dataclass
class Pruned:
    """The prune stage's output."""

    ctx: PruneContext
    result: MethodResult
    model: torch.nn.Module  # on the CPU, in eval mode
    costs: Costs
    speed_checks: dict[str, Any] = field(default_factory=dict)


@dataclass
class Recovered:
    """The recover stage's output."""

    model: torch.nn.Module  # on the CPU, in eval mode
    mode: str  # the recovery mode used: "none", "finetune" or "scratch"
    epochs: float
    curve: list[float]  # the recovery loss per epoch
    distill: dict[str, Any] | None
    measured: dict[str, Any]  # the method's post-recovery measurements
    lr: float | None = None  # the learning rate trained with (None: no training)
    lr_choice: dict[str, Any] | None = None  # recovery.choose_lr's table, when it chose


# Re-run a method's allocation with the other width set only when its first run took at most
# this long (seconds): the comparison then costs a few seconds, not a second training.
COMPARE_RERUN_S = 30.0


def timing_baseline(loaded: load.LoadedModel, x32: np.ndarray, opset: int) -> bytes:
    """The original as verify times it (dynamic batch), built before pruning for latency search."""
    base = dynamic_batch(loaded.onnx_model).SerializeToString()
    try:
        load.ort_session(base).run(None, {loaded.input_name: x32})
        return base
    except Exception:
        return export_mod.export_onnx(
            loaded.module, torch.from_numpy(x32[:1]), opset, input_name=loaded.input_name
        ).SerializeToString()


# Calibration inputs the width sets' top-1 agreement with the original is measured on: at
# most this many, and fewer for a large model (about AGREEMENT_MACS multiply-adds in all per
# forward, a few seconds on a CPU), never fewer than 32.
AGREEMENT_SAMPLES = 256
AGREEMENT_MACS = 2e11


def _first_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out:
        return _first_tensor(out[0])
    if isinstance(out, dict) and out:
        return _first_tensor(next(iter(out.values())))
    return None


def _outputs(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = _first_tensor(module(x.to(device)))
    finally:
        module.train(was_training)
    return None if out is None else out.detach().float().cpu()


def top1_agreement(
    original: torch.nn.Module, calibration: torch.Tensor, macs: float
) -> Callable[[Any], float | None] | None:
    """A method result's share of calibration inputs (training data, never the test split)
    on which its top-1 output (argmax over the last dimension: classes, or each position's
    vocabulary) is the original's. None when the output has no classes to agree on."""
    n = int(min(AGREEMENT_SAMPLES, max(32, AGREEMENT_MACS // max(macs, 1.0))))
    x = calibration[:n]
    if len(x) == 0:
        return None
    ref = _outputs(original, x)
    if ref is None or ref.dim() < 2 or ref.shape[-1] < 2:
        return None
    want = ref.argmax(-1)

    def agreement(result: Any) -> float | None:
        out = _outputs(result.model, x)
        if out is None or out.shape != ref.shape:
            return None
        return float((out.argmax(-1) == want).float().mean())

    return agreement


def prune(prep: Prepared, progress: StageProgress, *, latency_threads: int | None = None) -> Pruned:
    """Run the method (progressively when the schedule asks), then, when widths were chosen
    by measured latency, re-choose until the pruned network is not slower than the original."""
    spec, example = prep.spec, prep.example
    ctx = prep.context(progress)
    x32 = prep.data.x_test[:32].numpy()
    latency_mod.attach(
        ctx,
        timing_baseline(prep.loaded.model, x32, spec.export.opset),
        prep.loaded.model.input_name,
        x32,
        latency_threads,
        progress,
    )
    t0 = time.perf_counter()
    result: MethodResult = progressive.run(prep.method, ctx, prep.info.name)
    method_seconds = time.perf_counter() - t0
    speed_checks: dict[str, Any] = {}
    if ctx.latency is not None and not result.dynamic and spec.target.kind != "layers":
        # A re-run with other widths runs the way the first did: progressively when the
        # schedule asks (else a kept re-run silently shipped a one-step pruning).
        rerun = result.rerun or (lambda: progressive.run(prep.method, ctx, prep.info.name))
        result, speed_checks = latency_mod.ensure_faster(
            ctx.latency,
            ctx.latency_timer,
            rerun,
            result,
            lambda r: r.model.cpu().eval(),
            LATENCY_BATCHES,
            prep.notes,
            progress,
            meets_target=lambda r: latency_mod.meets_budget(
                spec.target, torch_costs(r.model.cpu().eval(), example), prep.base_costs
            ),
            floor_ms=spec.gates.min_speedup_floor_ms,
            # The other width set is always timed when the method's allocation is cheap to
            # re-run; a method that trains (slimming, ANP, TAS…) re-runs only when slower.
            # A latency target's search already chose the widths by timing whole networks;
            # comparing "faster" there would favour landing below the target.
            compare=method_seconds <= COMPARE_RERUN_S and spec.target.kind != "latency",
            agreement=top1_agreement(prep.module, prep.calibration, prep.base_costs.macs),
        )
        speed_checks["method_seconds"] = round(method_seconds, 2)
    model = result.model.cpu().eval()
    prep.notes.extend(result.notes)
    return Pruned(ctx, result, model, torch_costs(model, example), speed_checks)


def _epoch_message(epochs: float) -> Any:
    def message(s: int, total: int, loss: float) -> str:
        done = 1 + int((s - 1) * math.ceil(epochs) // total)
        return f"epoch {done}/{math.ceil(epochs)} loss {loss:.4f}"

    return message


def recover(prep: Prepared, pruned: Pruned, progress: StageProgress) -> Recovered:
    """Fine-tune (or re-initialise and train: scratch, Scratch-B scaling the epochs by the
    MACs saved) with the spec's and the method's distillation and extra losses."""
    spec, result, model = prep.spec, pruned.result, pruned.model
    rec = spec.recovery
    mode = "scratch" if result.recovery == "scratch" and rec.mode != "none" else rec.mode
    epochs: float = rec.epochs if result.recovery_epochs is None else result.recovery_epochs
    if mode == "scratch":
        if rec.epochs_mode == "B":
            epochs = int(math.ceil(rec.epochs * prep.base_costs.macs / max(pruned.costs.macs, 1)))
        train.reinitialize(model, spec.seed)
    curve: list[float] = []
    kd = recovery.distillation(spec, result.distill) if mode != "none" else None
    extra = recovery.combine(
        recovery.distill_loss(prep.module, kd, prep.device), result.recovery_extra_loss
    )
    if kd:
        prep.notes.append(
            f"recovery distilled from the original model's logits (alpha {kd['alpha']}, T {kd['temperature']}, from {kd['source']})"
        )
    lr: float | None = None
    choice: dict[str, Any] | None = None
    if mode != "none" and epochs > 0:
        lr = rec.base_lr
        if mode == "finetune" and rec.choosing_lr():
            screen = rec.lr_screen_for(epochs)
            lr, choice = _choose_lr(
                prep, pruned, model, screen, extra, lambda f, m: progress(0.6 * f, m)
            )
        message = _epoch_message(epochs)
        start = 0.0 if choice is None else 0.6
        curve = recovery.train_epochs(
            pruned.ctx,
            model,
            epochs,
            lr=lr,
            extra_loss=extra,
            on_step=lambda s, total, loss: progress(
                start + (1 - start) * s / total, message(s, total, loss)
            ),
        )
    model = model.cpu().eval()
    measured: dict[str, Any] = {}
    if result.post_recovery is not None:
        measured = dict(result.post_recovery(prep.module, model, prep.data))
        model = model.cpu().eval()
    return Recovered(model, mode, epochs, curve, kd, measured, lr, choice)


def _choose_lr(
    prep: Prepared,
    pruned: Pruned,
    model: torch.nn.Module,
    epochs: float,
    extra: recovery.ExtraLoss | None,
    progress: StageProgress,
) -> tuple[float, dict[str, Any] | None]:
    """recovery.lr is null: the fine-tune's learning rate is chosen on a validation part of
    the training split (`recovery.choose_lr`); a training split too small to hold one out
    keeps the first choice, with a note."""
    rec = prep.spec.recovery
    choices = list(dict.fromkeys(rec.lr_choices))
    try:
        lr, choice = recovery.choose_lr(
            pruned.ctx, model, choices, epochs, extra, progress=progress
        )
    except ValueError as exc:  # too few training samples for a validation part
        prep.notes.append(f"recovery learning rate not chosen ({exc}); trained at {choices[0]:g}")
        return choices[0], None
    table = ", ".join(
        f"{r['lr']:g} {r['val_accuracy']:.4f}" if "val_accuracy" in r else f"{r['lr']:g} diverged"
        for r in choice["table"]
    )
    prep.notes.append(
        f"recovery learning rate {lr:g}, chosen by {choice['metric']} on {choice['validation_samples']} "
        f"held-out training samples after {choice['screen_epochs']:g} epoch(s) each ({table}; "
        f"{choice['seconds']:.1f} s), then fine-tuned on the whole training split; set "
        "recovery.lr to skip the choice"
    )
    return lr, choice
