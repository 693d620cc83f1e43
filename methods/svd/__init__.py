"""svd: truncated SVD of every Linear, the low-rank baseline for flop.

Params and registration (torch-free); the method is in `impl.py`.
"""

from __future__ import annotations

from pydantic import Field

from methods.registry import MethodInfo, MethodParams, needs_linear, register


class SvdParams(MethodParams):
    include_head: bool = Field(
        default=False, description="also factorise the output layer (logits)"
    )
    min_rank: int = Field(
        default=1, ge=1, description="components always kept per factorised layer"
    )


register(
    MethodInfo(
        name="svd",
        summary="Truncated SVD of every Linear at the same rank fraction per layer, compiled into two "
        "dense layers: the low-rank baseline for flop.",
        paper="Baseline of Wang, Wohlwend, Lei 2020 (FLOP); Denton et al. 2014, Exploiting Linear Structure Within CNNs",
        params=SvdParams,
        implementation="methods.svd.impl:TruncatedSVD",
        tasks=("classification", "language_modeling"),
        applies=needs_linear,
    )
)
