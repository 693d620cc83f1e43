"""Recovery helpers shared by the pipeline, progressive pruning and `auto`: which
distillation applies, and training for a (possibly fractional) number of epochs."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from engine import train
from prunery.spec import JobSpec

ExtraLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def distillation(
    spec: JobSpec, method_distill: dict[str, float] | None = None
) -> dict[str, Any] | None:
    """The distillation recovery uses: the method's own (TAS asks for it with its own
    alpha/T), else the spec's `recovery.distill` when enabled, else None."""
    if method_distill:
        return {
            "alpha": float(method_distill.get("alpha", 0.9)),
            "temperature": float(method_distill.get("temperature", 4.0)),
            "source": "method",
        }
    kd = spec.recovery.distill
    if not kd.enabled or kd.alpha == 0.0:
        return None
    return {"alpha": kd.alpha, "temperature": kd.temperature, "source": "recovery.distill"}


def distill_loss(
    teacher: nn.Module, kd: dict[str, Any] | None, device: torch.device
) -> ExtraLoss | None:
    """The training loop's extra loss for `kd` (a frozen copy of `teacher` on `device`)."""
    if kd is None:
        return None
    frozen = copy.deepcopy(teacher).to(device).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    return train.distillation_loss(frozen, kd["alpha"], kd["temperature"])


def combine(first: ExtraLoss | None, second: ExtraLoss | None) -> ExtraLoss | None:
    if first is None or second is None:
        return first or second
    return lambda m, x, y, lo: first(m, x, y, lo) + second(m, x, y, lo)


def train_epochs(
    ctx, model: nn.Module, epochs: float, seed_offset: int = 0, **kwargs: Any
) -> list[float]:
    """`ctx.train` for `epochs` epochs, where a fraction means one pass over that share of
    the training data (one learning-rate schedule over the whole run). Returns the loss
    curve (one value per call of the loop)."""
    if epochs <= 0:
        return []
    if float(epochs).is_integer():
        return ctx.train(model, int(epochs), **kwargs)
    x, y = ctx.data.x_train, ctx.data.y_train
    n = len(x)
    gen = torch.Generator().manual_seed(ctx.seed + 7919 + seed_offset)
    whole = int(math.floor(epochs))
    parts = [torch.randperm(n, generator=gen) for _ in range(whole)]
    parts.append(torch.randperm(n, generator=gen)[: max(1, round((epochs - whole) * n))])
    idx = torch.cat(parts)
    data = dataclasses.replace(ctx.data, x_train=x[idx], y_train=y[idx])
    return dataclasses.replace(ctx, data=data).train(model, 1, **kwargs)
