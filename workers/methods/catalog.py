"""The method registry: names, parameter schemas, papers and applicability checks.

Torch-free on purpose: the API serves `GET /v1/methods` and validates job specs from this
module without importing the engine. Each entry names its implementation
("module:Class"), which the engine imports only when a job runs it.

Adding a method: write `workers/methods/<name>.py` with a class implementing
`workers.engine.method.Method`, then `register(MethodInfo(...))` here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from workers.checks import ModelSummary
from workers.errors import BadSpec, NotApplicable


class MethodParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


Applicability = Callable[[ModelSummary, str], str | None]
"""(model summary, task) -> None when the method applies, else the reason it does not."""


@dataclass(frozen=True)
class MethodInfo:
    name: str
    summary: str
    paper: str
    params: type[MethodParams]
    implementation: str  # "module:Class"
    tasks: tuple[str, ...] = ("classification",)
    applies: Applicability | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "summary": self.summary,
            "paper": self.paper,
            "tasks": list(self.tasks),
            "params_schema": self.params.model_json_schema(),
        }


_REGISTRY: dict[str, MethodInfo] = {}


def register(info: MethodInfo) -> MethodInfo:
    if info.name in _REGISTRY:
        raise ValueError(f"method {info.name!r} is already registered")
    _REGISTRY[info.name] = info
    return info


def list_methods() -> list[MethodInfo]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def get_method(name: str) -> MethodInfo:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise BadSpec(f"unknown method {name!r}; known methods: {known}") from None


def validate_params(name: str, params: dict[str, Any]) -> MethodParams:
    info = get_method(name)
    try:
        return info.params.model_validate(params)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(params)'}: {e['msg']}" for e in exc.errors()
        )
        raise BadSpec(f"method {name!r} params are invalid: {problems}") from None


def check_applicable(name: str, summary: ModelSummary, task: str) -> None:
    info = get_method(name)
    if task not in info.tasks:
        raise NotApplicable(f"method {name!r} is not applicable to task {task!r} (it supports {list(info.tasks)})")
    if info.applies is not None:
        reason = info.applies(summary, task)
        if reason:
            raise NotApplicable(f"method {name!r} is not applicable to this model: {reason}")


# ------------------------------------------------------------------ helpers for checks

_CHANNEL_OPS = {"Conv", "Gemm", "MatMul", "ConvTranspose"}


def needs_prunable_layers(summary: ModelSummary, task: str) -> str | None:
    if not _CHANNEL_OPS & set(summary.op_histogram):
        return "the graph has no Conv, Gemm or MatMul layer whose channels could be pruned"
    return None


def needs_conv(summary: ModelSummary, task: str) -> str | None:
    if "Conv" not in summary.op_histogram:
        return "the graph has no Conv layer"
    return None


# ------------------------------------------------------------------ the methods


Allocation = Literal["uniform", "global"]


class L1NormParams(MethodParams):
    allocation: Allocation = Field(
        default="uniform",
        description="uniform: the same ratio in every prunable layer (Li et al.); "
        "global: one ranking of normalised filter norms across layers. "
        "Per-layer ratios are given with target.layers.",
    )


class RandomParams(MethodParams):
    allocation: Allocation = Field(default="uniform", description="as for l1_norm")


register(
    MethodInfo(
        name="l1_norm",
        summary="Remove the output filters with the smallest L1 norm (coupled channels of a "
        "residual/concat group are scored together).",
        paper="Li, Kadav, Durdanovic, Samet, Graf. Pruning Filters for Efficient ConvNets. ICLR 2017. arXiv:1608.08710",
        params=L1NormParams,
        implementation="workers.methods.l1_norm:L1Norm",
        tasks=("classification", "language_modeling"),
        applies=needs_prunable_layers,
    )
)

register(
    MethodInfo(
        name="random",
        summary="Remove uniformly random channels at the same budget: the control every "
        "real method must beat.",
        paper="Control baseline (see Liu et al., Rethinking the Value of Network Pruning, ICLR 2019)",
        params=RandomParams,
        implementation="workers.methods.l1_norm:RandomChannels",
        tasks=("classification", "language_modeling"),
        applies=needs_prunable_layers,
    )
)


# ------------------------------------------------------------------ Rethinking-the-Value methods (issue 4)
# (network_slimming, thinet, channel_regression are registered below this line)


# ------------------------------------------------------------------ learned architectures (issue 5)
# (pruning_from_scratch, tas are registered below this line)


# ------------------------------------------------------------------ robust and dynamic (issue 6)
# (anp, sanp are registered below this line)


# ------------------------------------------------------------------ language models (issue 6)
# (flop is registered below this line)
