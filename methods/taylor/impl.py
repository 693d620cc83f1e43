"""taylor — first-order Taylor importance (Molchanov, Mallya, Tyree, Frosio, Kautz, CVPR 2019).

A channel's importance is the squared first-order estimate of the change of the loss when
the channel is removed, (sum of g·w over the parameters it removes)², computed on
mini-batches of labelled training data and averaged. Unlike a weight norm it sees what the
channel does to the loss: a channel that the rest of the network ignores scores ~0 however
large its weights, and scores of different layers are on one scale (the loss).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from engine import importance
from engine.method import PruneContext
from engine.train import task_loss
from methods.base.scoring import ScoringMethod
from methods.taylor import TaylorParams


class Taylor(ScoringMethod):
    params: TaylorParams

    def batches(self, ctx: PruneContext) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """`batches` shuffled mini-batches of the context's training split (never its test split)."""
        gen = torch.Generator().manual_seed(ctx.seed + 1)
        x, y = ctx.data.x_train, ctx.data.y_train
        order = torch.randperm(len(x), generator=gen)
        bs = self.params.batch_size
        for i in range(self.params.batches):
            idx = order[(i * bs) % len(x) :][:bs]
            if len(idx):
                yield x[idx], y[idx]

    def scores(self, ctx: PruneContext) -> dict[str, torch.Tensor]:
        return importance.taylor(
            ctx.model, ctx.example, ctx.groups, self.batches(ctx), task_loss, ctx.device
        )

    def extra_details(self, ctx: PruneContext) -> dict[str, Any]:
        p = self.params
        return {"calibration_samples": min(p.batches * p.batch_size, len(ctx.data.x_train))}
