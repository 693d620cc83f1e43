"""pruning_from_scratch: gates learned on random weights (Wang et al. 2020).

Params and registration (torch-free); the method is in `impl.py`.
"""

from __future__ import annotations

from pydantic import ConfigDict, Field

from methods.registry import MethodInfo, MethodParams, needs_prunable_layers, register


class PruningFromScratchParams(MethodParams):
    # `lambda` is a Python keyword: the field is lambda_, spelt "lambda" in specs and reports.
    model_config = ConfigDict(extra="forbid", serialize_by_alias=True)

    lambda_: float = Field(
        default=0.5,
        ge=0.0,
        alias="lambda",
        description="weight of the sparsity term lambda * (mean|g| - r)^2 added to the cross-entropy",
    )
    sparsity_level: float = Field(
        default=0.2,
        gt=0.0,
        lt=1.0,
        description="r: the mean gate value the gates are pulled towards",
    )
    gate_epochs: int = Field(
        default=10, ge=1, le=200, description="epochs of gate learning (weights frozen)"
    )
    gate_lr: float = Field(
        default=0.01, gt=0.0, le=1.0, description="Adam learning rate of the gates"
    )
    expand: float = Field(
        default=1.0,
        ge=1.0,
        le=4.0,
        description="width multiplier applied (by repeating channels) before gate learning; "
        "final widths are capped at the original",
    )


register(
    MethodInfo(
        name="pruning_from_scratch",
        summary="Learn channel gates on randomly initialised, frozen weights; keep the global "
        "top gates to meet the budget and train the architecture from scratch.",
        paper="Wang, Zhang, Zhang, Chang, Wang, Huang. Pruning from Scratch. AAAI 2020. arXiv:1909.12579",
        params=PruningFromScratchParams,
        implementation="methods.pruning_from_scratch.impl:PruningFromScratch",
        applies=needs_prunable_layers,
    )
)
