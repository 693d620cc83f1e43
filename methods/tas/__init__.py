"""tas: Transformable Architecture Search (Dong, Yang 2019).

Params and registration (torch-free); the method is in `impl.py`.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from methods.registry import MethodInfo, MethodParams, needs_prunable_layers, register


class TASParams(MethodParams):
    width_candidates: list[float] = Field(
        default=[0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0],
        min_length=2,
        description="candidate widths of every prunable group, as fractions of its channels",
    )
    tau_start: float = Field(
        default=5.0, gt=0.0, description="Gumbel-softmax temperature at the start (annealed)"
    )
    tau_end: float = Field(default=0.1, gt=0.0, description="Gumbel-softmax temperature at the end")
    search_epochs: int = Field(
        default=10, ge=1, le=500, description="epochs of the alternating search"
    )
    flop_weight: float = Field(
        default=2.0, ge=0.0, description="weight of the FLOPs loss in the architecture loss"
    )
    kd_alpha: float = Field(
        default=0.9, ge=0.0, le=1.0, description="distillation weight during recovery"
    )
    kd_temperature: float = Field(
        default=4.0, gt=0.0, description="distillation temperature during recovery"
    )
    arch_lr: float = Field(
        default=1e-3, gt=0.0, description="Adam learning rate of the width distributions"
    )
    weight_lr: float = Field(
        default=0.01,
        gt=0.0,
        description="SGD (momentum 0.9) learning rate of the weights during search",
    )
    flop_tolerance: float = Field(
        default=0.05,
        ge=0.0,
        lt=1.0,
        description="no FLOPs loss while the argmax architecture is under budget by at most this fraction of the target",
    )

    @field_validator("width_candidates")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if any(not 0.0 < f <= 1.0 for f in v):
            raise ValueError("width candidates are fractions of a layer's channels in (0, 1]")
        return sorted(set(v))


register(
    MethodInfo(
        name="tas",
        summary="Transformable Architecture Search: learn a distribution over widths per layer "
        "(Gumbel-softmax, shared weights, channel-wise interpolation, expected-FLOPs loss), take "
        "the argmax widths and recover with distillation from the original model.",
        paper="Dong, Yang. Network Pruning via Transformable Architecture Search. NeurIPS 2019. arXiv:1905.09717",
        params=TASParams,
        implementation="methods.tas.impl:TAS",
        applies=needs_prunable_layers,
    )
)
