"""taylor: first-order Taylor importance (Molchanov et al. 2019).

Params and registration (torch-free); the method is in `impl.py`.
"""

from __future__ import annotations

from pydantic import Field

from methods.registry import Allocation, MethodInfo, MethodParams, needs_prunable_layers, register


class TaylorParams(MethodParams):
    batches: int = Field(
        default=16,
        ge=1,
        le=10_000,
        description="labelled training mini-batches the scores are averaged over",
    )
    batch_size: int = Field(default=64, ge=1, le=65_536, description="samples per mini-batch")
    allocation: Allocation = Field(default="uniform", description="as for l1_norm")


register(
    MethodInfo(
        name="taylor",
        summary="Remove the channels with the smallest first-order Taylor estimate of the loss change "
        "(sum of gradient x weight over the removed parameters, squared, averaged over labelled batches).",
        paper="Molchanov, Mallya, Tyree, Frosio, Kautz. Importance Estimation for Neural Network Pruning. "
        "CVPR 2019. arXiv:1906.10771",
        params=TaylorParams,
        implementation="methods.taylor.impl:Taylor",
        tasks=("classification", "language_modeling"),
        applies=needs_prunable_layers,
    )
)
