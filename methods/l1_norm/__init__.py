"""l1_norm: remove the filters with the smallest L1 norm (Li et al. 2017).

Params and registration (torch-free); the method is in `impl.py`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from methods.registry import Allocation, MethodInfo, MethodParams, needs_prunable_layers, register


class L1NormParams(MethodParams):
    allocation: Allocation = Field(
        default="uniform",
        description="uniform: the same ratio in every prunable layer (Li et al.); "
        "global: one ranking of normalised filter norms across layers. "
        "Per-layer ratios are given with target.layers.",
    )
    normalizer: Literal["none", "mean", "max", "sum"] = Field(
        default="none",
        description="how each coupled layer's filter norms are normalised before the group reduction "
        "(mean: divided by that layer's mean), so that one layer with large weights does not decide "
        "the cut of a residual/concat group; 'none' is the raw norm (best on the zoo together with "
        "inputs=true at 0.5 MACs; 'mean' was best without inputs at 0.25, see benchmarks/accuracy.py)",
    )
    group_reduction: Literal["sum", "mean", "max", "first"] = Field(
        default="sum",
        description="how the coupled layers' (normalised) scores of a channel are combined; "
        "'first' scores the group's root layer only",
    )
    inputs: bool = Field(
        default=True,
        description="also score the input-channel weights of the layers that consume the group "
        "(as Torch-Pruning's GroupMagnitudeImportance does): what the next layer reads from a channel; "
        "false scores only the group's own output filters (Li et al.)",
    )


register(
    MethodInfo(
        name="l1_norm",
        summary="Remove the output filters with the smallest L1 norm (coupled channels of a "
        "residual/concat group are scored together).",
        paper="Li, Kadav, Durdanovic, Samet, Graf. Pruning Filters for Efficient ConvNets. ICLR 2017. arXiv:1608.08710",
        params=L1NormParams,
        implementation="methods.l1_norm.impl:L1Norm",
        tasks=("classification", "language_modeling"),
        applies=needs_prunable_layers,
    )
)
