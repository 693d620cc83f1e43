"""The method registry: names, parameter schemas, papers and applicability checks.

Torch-free on purpose: the API serves `GET /v1/methods` and validates job specs from this
module without importing the engine. Each entry names its implementation
("module:Class"), which the engine imports only when a job runs it.

Each method is one folder, `methods/<name>/`: its `__init__.py` defines the params model
and calls `register(MethodInfo(...))` (torch-free); its `impl.py` holds the class
implementing `engine.method.Method`. Importing the `methods` package registers every
folder (see `methods/__init__.py` and CONTRIBUTING.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from core.errors import BadSpec, NotApplicable
from core.validation.onnx_checks import ModelSummary


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
    implementation: str  # "module:Class", e.g. "methods.l1_norm.impl:L1Norm"
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
        raise NotApplicable(
            f"method {name!r} is not applicable to task {task!r} (it supports {list(info.tasks)})"
        )
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


def needs_prunable_conv(summary: ModelSummary, task: str) -> str | None:
    return needs_conv(summary, task) or needs_prunable_layers(summary, task)


def needs_linear(summary: ModelSummary, task: str) -> str | None:
    if not {"Gemm", "MatMul"} & set(summary.op_histogram):
        return "the graph has no Gemm or MatMul (Linear) layer to factorise"
    return None


Allocation = Literal["uniform", "global"]
