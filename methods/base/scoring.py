"""The scoring template: score every group's channels, prune to the budget.

A scoring method (l1_norm, random, taylor) only says how channels are scored: it
subclasses `ScoringMethod` and implements `scores(ctx)` (and optionally `extra_details`).
The template ranks the scores with the params' `allocation` (uniform or global), lets the
engine's budget search find the cut, and reports the channels removed per group.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.method import MethodResult, PruneContext
from methods.registry import MethodParams


def filter_l1(module: nn.Module) -> torch.Tensor | None:
    """Sum of |w| of each output filter of a Conv/Linear; None for other layers."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
        return module.weight.detach().abs().flatten(1).sum(1)
    return None


class ScoringMethod:
    """Subclasses implement `scores`; `params` must have an `allocation` field."""

    def __init__(self, params: MethodParams) -> None:
        self.params = params

    def scores(self, ctx: PruneContext) -> dict[str, torch.Tensor]:
        """{group name: one score per root channel}; the lowest are removed first."""
        raise NotImplementedError

    def extra_details(self, ctx: PruneContext) -> dict[str, Any]:
        """Method-specific entries added to the report's details."""
        return {}

    def run(self, ctx: PruneContext) -> MethodResult:
        scores = self.scores(ctx)
        allocation = self.params.allocation  # type: ignore[attr-defined]
        pruned, plan, details = ctx.prune_to_budget(scores, allocation)
        details["removed_channels"] = {k: len(v) for k, v in plan.items()}
        details.update(self.extra_details(ctx))
        return MethodResult(pruned, details=details)
