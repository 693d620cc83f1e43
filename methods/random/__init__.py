"""random: the control baseline, uniformly random channels at the same budget.

Params and registration (torch-free); the method is in `impl.py`.
"""

from __future__ import annotations

from pydantic import Field

from methods.registry import Allocation, MethodInfo, MethodParams, needs_prunable_layers, register


class RandomParams(MethodParams):
    allocation: Allocation = Field(default="uniform", description="as for l1_norm")


register(
    MethodInfo(
        name="random",
        summary="Remove uniformly random channels at the same budget: the control every "
        "real method must beat.",
        paper="Control baseline (see Liu et al., Rethinking the Value of Network Pruning, ICLR 2019)",
        params=RandomParams,
        implementation="methods.random.impl:RandomChannels",
        tasks=("classification", "language_modeling"),
        applies=needs_prunable_layers,
    )
)
