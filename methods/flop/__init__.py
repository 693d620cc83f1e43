"""flop: L0-gated low-rank factorisation of Linear layers (Wang et al. 2020).

Params and registration (torch-free); the method is in `impl.py`.
"""

from __future__ import annotations

from pydantic import Field

from methods.registry import MethodInfo, MethodParams, needs_linear, register


class FlopParams(MethodParams):
    epochs: int = Field(
        default=3,
        ge=1,
        le=1000,
        description="L0 training epochs (gates, weights and multipliers together)",
    )
    lr: float = Field(
        default=1e-3, gt=0, description="learning rate of the weights (P, Q, the rest of the model)"
    )
    gate_lr: float = Field(
        default=2e-2, gt=0, description="learning rate (Adam) of the gates' log-alpha"
    )
    lambda_lr: float = Field(
        default=0.2,
        gt=0,
        description="step of the plain gradient ascent on the Lagrange multipliers",
    )
    temperature: float = Field(default=1.0, gt=0, description="hard-concrete temperature")
    init_mean: float = Field(
        default=0.5, gt=0, lt=1, description="initial deterministic gate value"
    )
    warmup_fraction: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="share of the steps over which the target sparsity ramps up from 0",
    )
    include_head: bool = Field(
        default=False, description="also factorise the output layer (logits)"
    )
    min_rank: int = Field(
        default=1, ge=1, description="components always kept per factorised layer"
    )


register(
    MethodInfo(
        name="flop",
        summary="Factorise every Linear from its SVD as P diag(z) Q with hard-concrete L0 gates on the "
        "rank-one components, control the expected size with an augmented Lagrangian, keep the largest "
        "gates and compile each Linear into two smaller dense ones.",
        paper="Wang, Wohlwend, Lei. Structured Pruning of Large Language Models. EMNLP 2020. arXiv:1910.04732",
        params=FlopParams,
        implementation="methods.flop.impl:Flop",
        tasks=("classification", "language_modeling"),
        applies=needs_linear,
    )
)
