"""l1_norm (Li et al. 2017).

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

from typing import Any

import torch

from engine import importance
from engine.method import PruneContext
from methods.base.scoring import ScoringMethod
from methods.l1_norm import L1NormParams


class L1Norm(ScoringMethod):
    prunes_heads = True  # attention heads are scored by the L1 of their q, k and v rows
    params: L1NormParams

    def scores(self, ctx: PruneContext) -> dict[str, torch.Tensor]:
        p = self.params
        return importance.magnitude(
            ctx.model, ctx.dependency_graph(), ctx.groups, p.normalizer, p.group_reduction, p.inputs
        )

    def extra_details(self, ctx: PruneContext) -> dict[str, Any]:
        p = self.params
        return {
            "importance": {
                "normalizer": p.normalizer,
                "group_reduction": p.group_reduction,
                "inputs": p.inputs,
            }
        }
