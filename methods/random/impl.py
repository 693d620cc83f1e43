"""random: the control every real method must beat (uniformly random channel scores)."""

from __future__ import annotations

import torch

from engine.method import PruneContext
from methods.base.scoring import ScoringMethod


class RandomChannels(ScoringMethod):
    prunes_heads = True

    def scores(self, ctx: PruneContext) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(ctx.seed)
        return {
            g.name: torch.rand(g.channels, generator=gen, dtype=torch.float64) for g in ctx.groups
        }
