"""l1_norm (Li et al. 2017) and the `random` control.

Li et al. score each output filter by the sum of its absolute weights and drop the
smallest. Through the dependency graph, channels that must go together (a residual sum,
a concat slot, a depthwise conv after it) are scored together: the score of a root
channel is the reduction (`group_reduction`) over every coupled layer of its filter L1 —
and, with `inputs` (the default), of the input weights of the layers that read it — each
layer's scores optionally normalised first (`normalizer`, e.g. by the layer's mean) so that
one layer with large weights does not decide the whole group's cut. `normalizer="none"`,
`group_reduction="sum"`, `inputs=false` is the engine's behaviour before issue 14.
"""

from __future__ import annotations

import torch
from torch import nn

from workers.engine import importance
from workers.engine.method import MethodResult, PruneContext
from workers.methods.catalog import L1NormParams, RandomParams


def filter_l1(module: nn.Module) -> torch.Tensor | None:
    """Sum of |w| of each output filter of a Conv/Linear; None for other layers."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
        return module.weight.detach().abs().flatten(1).sum(1)
    return None


class L1Norm:
    prunes_heads = True  # attention heads are scored by the L1 of their q, k and v rows

    def __init__(self, params: L1NormParams) -> None:
        self.params = params

    def scores(self, ctx: PruneContext) -> dict[str, torch.Tensor]:
        p = self.params
        return importance.magnitude(
            ctx.model, ctx.dependency_graph(), ctx.groups, p.normalizer, p.group_reduction, p.inputs
        )

    def run(self, ctx: PruneContext) -> MethodResult:
        scores = self.scores(ctx)
        pruned, plan, details = ctx.prune_to_budget(scores, self.params.allocation)
        details["removed_channels"] = {k: len(v) for k, v in plan.items()}
        details["importance"] = {
            "normalizer": self.params.normalizer, "group_reduction": self.params.group_reduction,
            "inputs": self.params.inputs,
        }
        return MethodResult(pruned, details=details)


class RandomChannels:
    prunes_heads = True

    def __init__(self, params: RandomParams) -> None:
        self.params = params

    def run(self, ctx: PruneContext) -> MethodResult:
        gen = torch.Generator().manual_seed(ctx.seed)
        scores = {g.name: torch.rand(g.channels, generator=gen, dtype=torch.float64) for g in ctx.groups}
        pruned, plan, details = ctx.prune_to_budget(scores, self.params.allocation)
        details["removed_channels"] = {k: len(v) for k, v in plan.items()}
        return MethodResult(pruned, details=details)
