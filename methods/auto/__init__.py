"""auto: try candidate methods cheaply on a validation split, keep the best.

Params and registration (torch-free); the method is in `impl.py`.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from core.errors import BadSpec
from methods.registry import (
    MethodInfo,
    MethodParams,
    list_methods,
    needs_prunable_layers,
    register,
    validate_params,
)

AUTO_CANDIDATES = ["l1_norm", "taylor", "channel_regression"]


def parse_candidate(candidate: str) -> tuple[str, dict[str, str]]:
    """'channel_regression:allocation=global,samples=200' -> (method, {param: value}); the
    values are validated (and typed) by the method's own params model."""
    name, _, opts = candidate.partition(":")
    params: dict[str, str] = {}
    for item in filter(None, (o.strip() for o in opts.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(
                f"candidate {candidate!r}: write its parameters as method:key=value[,key=value]"
            )
        params[key.strip()] = value.strip()
    return name.strip(), params


class AutoParams(MethodParams):
    candidates: list[str] = Field(
        default_factory=lambda: list(AUTO_CANDIDATES),
        min_length=1,
        description="methods tried at the job's budget, each a method name or "
        "'method:key=value[,key=value]' (e.g. 'channel_regression:allocation=global'); each is "
        "pruned and briefly recovered on the training data minus a validation split, and the best "
        "validation accuracy wins",
    )
    validation_fraction: float = Field(
        default=0.15,
        gt=0.0,
        lt=0.5,
        description="share of the training split held out to rank the candidates (never the test split)",
    )
    screen_epochs: float = Field(
        default=1.0,
        gt=0.0,
        le=100.0,
        description="recovery epochs each candidate gets before it is ranked (may be a fraction)",
    )

    @field_validator("candidates")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        for candidate in v:
            name, params = parse_candidate(candidate)
            if name == "auto":
                raise ValueError("auto cannot be its own candidate")
            known = [m.name for m in list_methods()]
            if name not in known:
                raise ValueError(f"unknown candidate {name!r}; known methods: {', '.join(known)}")
            try:
                validate_params(name, params)
            except BadSpec as exc:
                raise ValueError(f"candidate {candidate!r}: {exc.message}") from None
        return list(dict.fromkeys(v))


register(
    MethodInfo(
        name="auto",
        summary="Try candidate methods cheaply (short recovery) at the job's budget on a validation split "
        "carved from the training data, keep the best and recover it fully; the report keeps the leaderboard.",
        paper="Model selection on held-out training data; candidates' papers as listed for each method",
        params=AutoParams,
        implementation="methods.auto.impl:Auto",
        tasks=("classification", "language_modeling"),
        applies=needs_prunable_layers,
    )
)
