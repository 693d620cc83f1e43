"""Progressive pruning (`schedule.steps`): reach the target in N steps, MACs (or parameters)
kept falling geometrically (t^(1/N), t^(2/N), ..., t), with a short recovery after every
step but the last. The recovery epochs are shared out: each step gets recovery.epochs / N,
so the total stays recovery.epochs (the pipeline's final recovery gets the last share).

A step re-runs the method on the network pruned so far, with the budget measured against
the *original* network; the groups keep their names (the probes of the analysis still hold:
removing channels does not make a safe group unsafe), only their widths shrink.
"""

from __future__ import annotations

import dataclasses
import time
from typing import cast

import torch
from torch import nn

from core.errors import BadSpec
from engine import heads, recovery
from engine.graph import ChannelGroup
from engine.heads import blocks_of
from engine.method import MethodResult, PruneContext

# Methods that score channels of ctx.groups and cut them with ctx.prune_to_budget, so they can
# run again on an already pruned network.
STEPPABLE = ("l1_norm", "taylor", "random", "thinet", "channel_regression")


def _width(model: nn.Module, name: str) -> int:
    """A group's width in the network pruned so far: a head group's remaining heads (kept
    on the pruned copy by the head surgery), else its producer's output channels."""
    if heads.is_head_group(name):
        return blocks_of(model)[name].heads
    m = model.get_submodule(name)
    return int(getattr(m, "out_channels", None) or cast(int, m.out_features))


def step_targets(fraction: float, steps: int) -> list[float]:
    return [fraction ** ((i + 1) / steps) for i in range(steps)]


def run(method, ctx: PruneContext, name: str) -> MethodResult:
    """Run `method` once (steps = 1) or progressively; the result's `recovery_epochs` says how
    many recovery epochs are left for the pipeline's final recovery."""
    steps = ctx.spec.schedule.steps
    if steps == 1 or getattr(method, "handles_schedule", False):  # auto steps each candidate itself
        return method.run(ctx)
    spec = ctx.spec
    if name not in STEPPABLE:
        raise BadSpec(
            f"schedule.steps > 1 needs a method that scores channels ({', '.join(STEPPABLE)}); {name!r} is not one"
        )
    if spec.target.kind == "layers":
        raise BadSpec("schedule.steps > 1 needs a flops or params target, not target.layers")
    if spec.recovery.mode == "scratch":
        raise BadSpec(
            "schedule.steps > 1 fine-tunes between steps; it has no meaning with recovery.mode 'scratch'"
        )
    share = spec.recovery.epochs / steps if spec.recovery.mode == "finetune" else 0.0
    kd = recovery.distillation(spec)
    extra = recovery.distill_loss(ctx.model, kd, ctx.device)
    current = ctx.model
    history = []
    result: MethodResult | None = None
    for i, frac in enumerate(step_targets(float(spec.target.fraction), steps)):  # type: ignore[arg-type]
        t0 = time.perf_counter()
        target = spec.target.model_copy(update={spec.target.kind: frac})
        groups = [ChannelGroup(g.name, _width(current, g.name), g.members) for g in ctx.groups]

        def step_progress(f: float, m: str | None, i: int = i) -> None:
            ctx.progress((i + f) / steps, m)

        step_ctx = dataclasses.replace(
            ctx,
            spec=spec.model_copy(update={"target": target}),
            model=current,
            analysis=dataclasses.replace(ctx.analysis, groups=groups),
            progress=step_progress,
        )
        result = method.run(step_ctx)
        current = result.model
        kept = step_ctx.costs(current)
        kept_frac = (
            kept.macs / ctx.base_costs.macs
            if spec.target.kind == "flops"
            else kept.params / ctx.base_costs.params
        )
        loss: list[float] = []
        if i < steps - 1 and share > 0:
            loss = recovery.train_epochs(ctx, current, share, seed_offset=i, extra_loss=extra)
            current = current.cpu().eval()
        history.append(
            {
                "step": i + 1,
                "target": round(frac, 5),
                "kept": round(kept_frac, 5),
                "recovery_epochs": round(share, 4) if i < steps - 1 else 0.0,
                "loss": [round(v, 5) for v in loss],
                "seconds": round(time.perf_counter() - t0, 2),
            }
        )
    assert result is not None
    result.model = current
    result.details["progressive"] = {"steps": steps, "history": history, "distill": kd}
    result.recovery_epochs = spec.recovery.epochs - share * (steps - 1)
    with torch.no_grad():
        current.eval()
    return result
