"""The method plugin interface.

A method is registered in a method catalog (`MethodCatalog`: name, params model, paper,
applicability; callers pass `methods.registry`, the engine never imports it) and
implemented by a class with `run(ctx) -> MethodResult`. The context gives it everything
the seed's methods need:

* one-shot criteria (l1_norm, ThiNet, LASSO): `ctx.groups`, `ctx.dependency_graph()`,
  `ctx.calibration` inputs, and `ctx.prune_to_budget(scores, allocation)`;
* training-time regularisation (Network Slimming): `ctx.train(..., after_backward=...)`;
* gates on frozen random weights (Pruning from Scratch): `ctx.train(params=gates)` and
  `MethodResult(recovery="scratch")`;
* width search with distillation (TAS): `ctx.prune_to_widths(...)`, `ctx.teacher`;
* adversarial masks (ANP): `ctx.train(extra_loss=...)`, `ctx.data` value range;
* per-sample dynamic gating (SANP): `MethodResult(dynamic=True)` keeps the gates in the
  exported graph and switches the report to measured average MACs;
* low-rank factorisation (FLOP): the method may return any module; the engine exports it.

The engine recovers (fine-tune or scratch), exports and verifies whatever comes back.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from pydantic import BaseModel
from torch import nn

from core.validation.onnx_checks import ModelSummary
from engine import budget, graph, train
from engine.flops import Costs, torch_costs
from prunery.spec import JobSpec


@dataclass
class MethodResult:
    model: nn.Module
    details: dict[str, Any] = field(default_factory=dict)
    # "scratch": the method's weights are not meant to be kept (e.g. PFS) — train from
    # scratch whatever recovery.mode says; None: follow the spec.
    recovery: Literal["scratch"] | None = None
    dynamic: bool = False
    notes: list[str] = field(default_factory=list)
    # Knowledge distillation during recovery (TAS): {"alpha": 0.9, "temperature": 4.0};
    # the teacher is the unpruned model.
    distill: dict[str, float] | None = None
    # Extra files for the job's artifacts (e.g. {"search_curves.png": bytes}).
    artifacts: dict[str, bytes] = field(default_factory=dict)
    # An extra recovery loss term, e.g. adversarial fine-tuning (ANP):
    # fn(model, x, y, logits) -> tensor, added to the cross-entropy.
    recovery_extra_loss: (
        Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None
    ) = None
    # Measurements after recovery: fn(original, recovered, data) -> dict. Keys "robustness"
    # and "dynamic" become the report blocks of those names (for dynamic models the report's
    # achieved MACs are dynamic["macs_mean"] / MACs before); other keys go to method_details.
    post_recovery: Callable[[nn.Module, nn.Module, train.TensorData], dict[str, Any]] | None = None
    # Recovery epochs left for the pipeline when the method already spent part of the budget
    # (progressive pruning fine-tunes between steps); None: recovery.epochs.
    recovery_epochs: float | None = None
    # How the engine re-runs this allocation with the other width set (the never-slower
    # comparison, engine/stages.py); None: the method runs again. auto re-runs its winner
    # alone instead of screening every candidate a second time.
    rerun: Callable[[], MethodResult] | None = None


class MethodInfo(Protocol):
    """What the engine reads of a catalog entry."""

    @property
    def name(self) -> str: ...
    @property
    def paper(self) -> str: ...
    @property
    def implementation(self) -> str: ...  # "module:Class"
    @property
    def tasks(self) -> tuple[str, ...]: ...


class MethodCatalog(Protocol):
    """The registered methods, injected by the caller (`from methods import registry`): the
    engine is a library and imports no method."""

    def list_methods(self) -> Sequence[MethodInfo]: ...
    def get_method(self, name: str) -> MethodInfo: ...
    def validate_params(self, name: str, params: dict[str, Any]) -> BaseModel: ...
    def check_applicable(self, name: str, summary: ModelSummary, task: str) -> None: ...


class Method(Protocol):
    def __init__(self, params: BaseModel) -> None: ...

    def run(self, ctx: PruneContext) -> MethodResult: ...


@dataclass
class PruneContext:
    spec: JobSpec
    model: nn.Module  # the converted, analysed model (do not modify in place: copy first)
    example: torch.Tensor  # one sample, batch 1
    calibration: torch.Tensor  # real training inputs (a few hundred)
    data: train.TensorData
    analysis: graph.Analysis
    base_costs: Costs
    device: torch.device
    seed: int
    progress: Callable[[float, str | None], None]
    # Measured per-group steps and time-per-MAC (engine.latency), None when
    # export.round_to is given and the target is not latency; `latency_timer` times whole
    # pruned networks against the original (latency targets).
    latency: Any = None
    latency_timer: Any = None
    # engine layer name -> the exporter's source module path (engine.load), so target.layers
    # may name a layer either way.
    source_names: dict[str, str] = field(default_factory=dict)
    # The training batch size, decided once from the job's whole training split
    # (recovery.batch_for), so auto's screening and the learning-rate choice, which train on
    # part of it, use the batch of the final fine-tune. None: from this context's data.
    train_batch: int | None = None

    @property
    def batch_size(self) -> int:
        return self.train_batch or self.spec.recovery.batch_for(len(self.data.x_train))

    @property
    def groups(self) -> list[graph.ChannelGroup]:
        return self.analysis.groups

    @property
    def round_to(self) -> int:
        # Methods that choose widths themselves (network_slimming's threshold, tas, pfs) get
        # the explicit round_to or 1; the measured per-group steps apply in prune_to_budget.
        return self.spec.export.round_to or 1

    @property
    def teacher(self) -> nn.Module:
        return self.model

    def copy_model(self) -> nn.Module:
        return copy.deepcopy(self.model)

    def dependency_graph(self, model: nn.Module | None = None):
        return graph.build_dependency_graph(
            model if model is not None else self.model, self.example
        )

    def costs(self, model: nn.Module) -> Costs:
        return torch_costs(model, self.example)

    def train(
        self, model: nn.Module, epochs: int, lr: float | None = None, **kwargs: Any
    ) -> list[float]:
        rec = self.spec.recovery
        kwargs.setdefault("batch_size", self.batch_size)
        kwargs.setdefault("optimizer", rec.optimizer)
        kwargs.setdefault("momentum", rec.momentum)
        kwargs.setdefault("weight_decay", rec.weight_decay)
        kwargs.setdefault("schedule", rec.schedule)
        kwargs.setdefault("seed", self.seed)
        kwargs.setdefault("device", self.device)
        return train.train(
            model, self.data, epochs=epochs, lr=lr if lr is not None else rec.base_lr, **kwargs
        )

    def prune_to_budget(
        self,
        scores: dict[str, torch.Tensor],
        allocation: str = "uniform",
        model: nn.Module | None = None,
        max_layer_ratio: float | None = None,
    ) -> tuple[nn.Module, budget.Plan, dict[str, Any]]:
        """Remove the lowest-scored channels (root-channel order of each group) until the
        spec's target is met; returns (pruned copy, plan, details)."""
        model = model if model is not None else self.model
        target = self.spec.target
        groups = [g for g in self.groups if g.name in scores]
        if target.layers is not None:
            # Explicit ratios are taken as given: rounded only to an explicit round_to.
            plan = budget.explicit_plan(
                groups,
                scores,
                target.layers,
                self.spec.export.round_to or 1,
                sources=self.source_names,
            )
            pruned = budget.apply_plan(model, self.example, plan)
            return pruned, plan, {"allocation": "layers", "evaluations": 1}
        if max_layer_ratio is None:
            max_layer_ratio = self.spec.export.max_layer_cut
        lat = self.latency

        def align(name: str) -> int:
            return lat.align_of(name) if lat is not None else 1

        chunks = budget.removal_order(
            groups,
            scores,
            allocation,
            self.round_to,
            max_layer_ratio,
            **(lat.order_options(weighted=target.kind == "latency") if lat else {}),
        )
        if target.kind == "latency":
            from engine.latency import search_latency

            assert target.latency is not None and target.latency_batch is not None
            pruned, plan, details = search_latency(
                model,
                self.example,
                chunks,
                float(target.latency),
                target.latency_batch,
                self.latency_timer,
                progress=lambda f: self.progress(f, None),
                tolerance=target.tolerance,
                # whole cells of a grouped conv, and widths on the NCHWc alignment
                quanta={g.name: math.lcm(g.quantum, align(g.name)) for g in groups},
            )
            return pruned, plan, {"allocation": allocation, **details}
        # Measured steps can straddle the tolerance: then one group (preferably one whose
        # time does not care about its width) takes an off-step width, the others keep theirs.
        result: budget.BudgetResult | None
        try:
            result = self._search_fraction(
                model,
                chunks,
                split_last=lat is not None,
                prefer=lat.flat_groups() if lat else (),
                widths={g.name: (g.channels, g.quantum, align(g.name)) for g in groups},
            )
        except budget.BudgetUnreachable:
            # Whole steps keep at least one step of every group; finer steps may reach it.
            if lat is None or lat.mode != "measured":
                raise
            result = None
        assert target.fraction is not None
        if (
            lat is not None
            and lat.mode == "measured"
            and (result is None or abs(result.kept - float(target.fraction)) > target.tolerance)
        ):
            # Still outside the tolerance (or out of reach): search again with the finest
            # steps that keep onnxruntime's blocked conv layout ("fine": the alignment, 1
            # where it has none), and if those straddle it too (a small net), with steps of 1
            # ("exact"): the budget comes first, and the whole-network check then times what
            # those widths cost.
            for mode in ("fine", "exact"):
                met = result is not None and (
                    abs(result.kept - float(target.fraction)) <= target.tolerance
                )
                if mode == "exact" and (met or all(g.align <= 1 for g in lat.groups.values())):
                    break
                lat.mode = mode
                chunks = budget.removal_order(
                    groups,
                    scores,
                    allocation,
                    1,
                    max_layer_ratio,
                    **lat.order_options(weighted=False),
                )
                result = self._search_fraction(model, chunks)
        assert result is not None
        return (
            result.model,
            result.plan,
            {
                "allocation": allocation,
                "evaluations": result.evaluations,
                "kept_torch_count": result.kept,
            },
        )

    def _search_fraction(
        self,
        model: nn.Module,
        chunks: Sequence[budget.Chunk],
        split_last: bool = False,
        prefer: Sequence[str] = (),
        widths: Mapping[str, tuple[int, int, int]] | None = None,
    ) -> budget.BudgetResult:
        """The budget search for a MACs or parameters fraction (the spec's target)."""
        target = self.spec.target
        assert target.fraction is not None  # a MACs or parameters target
        return budget.search(
            model,
            self.example,
            chunks,
            target.kind,
            float(target.fraction),
            self.base_costs,
            progress=lambda f: self.progress(f, None),
            tolerance=target.tolerance,
            split_last=split_last,
            prefer=prefer,
            widths=widths,
        )

    def prune_plan(self, plan: budget.Plan, model: nn.Module | None = None) -> nn.Module:
        return budget.apply_plan(model if model is not None else self.model, self.example, plan)


def widths_to_plan(
    groups: Sequence[graph.ChannelGroup], scores: dict[str, torch.Tensor], keep: dict[str, int]
) -> budget.Plan:
    """Keep the `keep[name]` best-scored channels of each group."""
    plan: budget.Plan = {}
    for g in groups:
        if g.name not in keep:
            continue
        order = torch.argsort(scores[g.name].double(), stable=True).tolist()
        plan[g.name] = order[: max(0, g.channels - keep[g.name])]
    return plan
