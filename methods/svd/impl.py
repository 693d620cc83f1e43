"""svd: truncated SVD of every Linear, compiled into two dense layers (the baseline of flop)."""

from __future__ import annotations

import torch

from engine.method import MethodResult, PruneContext
from methods.flop.impl import Flop


class TruncatedSVD(Flop):
    """The low-rank baseline FLOP is measured against: the same factorisation, no learning —
    every Linear keeps the same fraction of its largest singular components (found by
    search so the target is met), then the engine fine-tunes as usual."""

    def run(self, ctx: PruneContext) -> MethodResult:
        model = ctx.copy_model()
        layers = self.factorize(ctx, model)
        self.target_sparsity(ctx, layers)  # refuses an unreachable budget with the reason
        for layer in layers:
            with torch.no_grad():
                layer.module.log_alpha.fill_(20.0)  # deterministic gates = 1: plain SVD
        # SVD orders components by singular value; score = remaining fraction of the rank,
        # so the global ranking keeps the same fraction in every layer.
        scores = {
            layer.name: 1.0
            - torch.arange(layer.module.rank, dtype=torch.float64) / layer.module.rank
            for layer in layers
        }
        compiled, ranks, achieved = self.select(ctx, model, layers, scores)
        full = {layer.name: layer.module.rank for layer in layers}
        return MethodResult(
            compiled,
            details={
                "ranks": {k: {"kept": ranks[k], "full": full[k]} for k in ranks},
                "kept_fraction_torch_count": achieved,
            },
        )
