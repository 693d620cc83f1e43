"""The analyse stage's group search: one candidate group per Conv/Linear root, screened
by graph rules, then proven safe by batched zero-equivalence probes."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch_pruning as tp
from torch import nn

from core.errors import BadModel
from engine import grouped
from engine.bounded import AnalyseBudget, UnboundedGroup
from engine.graph.probe import probe_groups, run_located
from engine.graph.surgery import (
    PRUNABLE_ROOTS,
    ChannelGroup,
    GroupMember,
    build_dependency_graph,
    describe_group,
    module_names,
)

PROBE_SAMPLES = 4


@dataclass
class Analysis:
    groups: list[ChannelGroup]
    excluded: list[tuple[str, str]]
    lifted: list[str]
    probes: int = 0


def _output_layers(model: nn.Module) -> set[str]:
    """Conv/Linear layers whose output channels reach a model output without passing
    another Conv/Linear (the classifier): decided from the FX graph, without a probe."""
    if not isinstance(model, fx.GraphModule):
        return set()
    found: set[str] = set()
    stack = [n for n in model.graph.nodes if n.op == "output"]
    seen: set[fx.Node] = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module" and isinstance(
            model.get_submodule(str(node.target)), PRUNABLE_ROOTS
        ):
            found.add(str(node.target))
            continue
        stack.extend(a for a in node.all_input_nodes)
    names = module_names(model)
    return {names[model.get_submodule(t)] for t in found if model.get_submodule(t) in names}


def _analyse_seconds() -> float:
    import os

    try:
        return float(os.environ.get("PRUNERY_ANALYSE_SECONDS", "900"))
    except ValueError:
        return 900.0


def _candidate_groups(
    model: nn.Module, dg: tp.DependencyGraph, names: dict[nn.Module, str], budget: AnalyseBudget
) -> tuple[
    list[tuple[str, int, list[GroupMember], list[grouped.GroupedTie]]], list[tuple[str, str]]
]:
    """One group per unvisited Conv/Linear root (Torch-Pruning's get_all_groups, but each
    walk is bounded and a group that does not settle is excluded rather than fatal)."""
    roots = [m for m in dg.module2node if isinstance(m, PRUNABLE_ROOTS) and m in names]
    visited: set[int] = set()
    candidates = []
    excluded: list[tuple[str, str]] = []
    for k, m in enumerate(roots):
        if id(m) in visited:
            continue
        name = names[m]
        budget.at(
            f"coupling channels: layer {k + 1} of {len(roots)} ({name})",
            0.3 * k / max(len(roots), 1),
        )
        pruner = dg.get_pruner_of_module(m)
        if pruner is None or pruner.get_out_channels(m) is None:
            continue
        try:
            group = dg.get_pruning_group(
                m, pruner.prune_out_channels, list(range(pruner.get_out_channels(m)))
            )
        except UnboundedGroup as exc:
            visited.add(id(m))
            excluded.append((name, f"{exc}; this layer is left at full width"))
            continue
        for item in group:
            if dg.is_out_channel_pruning_fn(item.dep.handler) and isinstance(
                item.dep.target.module, nn.Module
            ):
                visited.add(id(item.dep.target.module))
        ties = grouped.ties_of(dg, group, names)
        dg.__dict__.setdefault("_prunery_ties", {})[name] = ties
        candidates.append((name, len(group[0].idxs), describe_group(model, dg, group, names), ties))
    return candidates, excluded


def _screen(
    candidates: list[tuple[str, int, list[GroupMember], list[grouped.GroupedTie]]],
    ignored: set[str],
    outputs: set[str],
    round_to: int | None,
    seed: int,
    excluded: list[tuple[str, str]],
) -> dict[str, list[int]]:
    """Graph rules that exclude a group without a probe (appended to `excluded` with the
    reason); for the others, the random channels each probe removes."""
    gen = torch.Generator().manual_seed(seed)
    step = max(1, round_to or 1)  # None: widths measured per layer later (latency.py)
    to_probe: dict[str, list[int]] = {}
    for name, channels, members, ties in candidates:
        if name in ignored:
            excluded.append((name, "excluded by the method"))
            continue
        if any(mem.role == "out" and mem.name in outputs for mem in members):
            # Graph rule, no probe needed: these channels are the model's outputs.
            excluded.append(
                (
                    name,
                    f"its channels are the model's outputs ({channels} of them); removing any would change what the model returns",
                )
            )
            continue
        clash = grouped.conflict(ties)
        if clash is not None:
            excluded.append((name, clash))
            continue
        if ties and ties[0].max_cells < 1:
            what = "is a single block" if ties[0].kind == "block" else "has one channel per block"
            excluded.append((name, f"grouped convolution {ties[0].conv} {what}"))
            continue
        if channels <= step:
            excluded.append(
                (name, f"only {channels} channel(s): nothing can be removed at round_to={round_to}")
            )
            continue
        # Probe with a random set (not a prefix) so a head-aligned reshape cannot pass by luck.
        k = step if step > 1 else min(2, channels - 1)
        to_probe[name] = sorted(torch.randperm(channels, generator=gen)[:k].tolist())
    return to_probe


class _Prover:
    """Batched probes: a batch of groups removed together; only a batch that fails is split
    in halves, so f unsafe groups out of n need about 1 + 2 f log2(n) probes."""

    def __init__(
        self,
        model: nn.Module,
        example: torch.Tensor,
        batch: torch.Tensor,
        to_probe: dict[str, list[int]],
        info: dict[str, tuple[int, list[GroupMember]]],
        budget: AnalyseBudget,
        reference_shape: torch.Size,
    ) -> None:
        self.model, self.example, self.batch = model, example, batch
        self.to_probe, self.info, self.budget = to_probe, info, budget
        self.reference_shape = reference_shape
        self.reasons: dict[str, str | None] = {}
        self.done = 0
        self.probes = 0

    def settle(self, names_: list[str]) -> None:
        self.budget.at(
            f"proving groups safe: {self.done} of {len(self.to_probe)} settled (probing {', '.join(names_[:3])}"
            + (f" and {len(names_) - 3} more)" if len(names_) > 3 else ")"),
            0.3 + 0.7 * self.done / max(len(self.to_probe), 1),
        )
        self.probes += 1
        plan = {n: self.to_probe[n] for n in names_}
        reason = probe_groups(
            self.model, self.example, self.batch, plan, self.budget, self.reference_shape
        )
        if reason is None:
            for n in names_:
                self.reasons[n] = None
            self.done += len(names_)
        elif len(names_) == 1:
            self.reasons[names_[0]] = self._single(names_[0], reason)
            self.done += 1
        else:
            half = len(names_) // 2
            self.settle(names_[:half])
            self.settle(names_[half:])

    def _single(self, only: str, reason: str) -> str | None:
        if "shared with a normalisation" in reason and any(
            mm.op == "LayerNorm" for mm in self.info[only][1]
        ):
            # The residual stream: LayerNorm statistics over the kept channels (residual.py).
            from engine.residual import probe_layernorm_coupled

            m, x, b = self.model, self.example, self.batch
            return probe_layernorm_coupled(m, x, b, only, self.to_probe[only]) and reason
        return reason


def analyse(
    model: nn.Module,
    example: torch.Tensor,
    batch: torch.Tensor,
    round_to: int | None = 1,
    seed: int = 0,
    ignored: Iterable[str] = (),
    progress: Callable[..., None] | None = None,
    seconds: float | None = None,
) -> Analysis:
    """List prunable groups (each proven safe by a probe) and excluded ones with reasons.

    Bounded: every group walk is capped (bounded.py), the whole stage has a wall-clock budget
    (`seconds`, default $PRUNERY_ANALYSE_SECONDS or 900) whose error names the layer it was
    on, and `progress(fraction, message)` is called often (it may raise to cancel).
    Probes are batched: all candidates are removed together in one probe, and only a batch
    that fails is split in halves, so a model with f unsafe groups out of n needs about
    1 + 2 f log2(n) probes instead of n.
    """
    budget = AnalyseBudget(seconds if seconds is not None else _analyse_seconds(), progress)
    budget.at("tracing the model", 0.0)
    try:
        dg = build_dependency_graph(model, example)
    except Exception as exc:
        raise BadModel(
            f"Torch-Pruning could not trace the converted model: {type(exc).__name__}: {exc}"
        ) from None
    dg.budget = budget
    candidates, excluded = _candidate_groups(model, dg, module_names(model), budget)
    info = {name: (channels, members) for name, channels, members, _ in candidates}
    ties_by_name = {name: ties for name, _, _, ties in candidates}
    to_probe = _screen(candidates, set(ignored), _output_layers(model), round_to, seed, excluded)
    # A few samples prove zero equivalence as well as many (any misalignment shows on one).
    batch = batch[:PROBE_SAMPLES]
    with torch.no_grad():
        reference_shape = run_located(model, batch).shape
    prover = _Prover(model, example, batch, to_probe, info, budget, reference_shape)
    order = list(to_probe)
    # Batches of bounded size keep one failing group from costing a probe of everything.
    for start in range(0, len(order), 32):
        prover.settle(order[start : start + 32])
    groups: list[ChannelGroup] = []
    for name in order:
        if prover.reasons.get(name) is None:
            channels, members = info[name]
            tie = ties_by_name[name][0] if ties_by_name[name] else None
            groups.append(
                ChannelGroup(
                    name,
                    channels,
                    members,
                    quantum=tie.quantum if tie else 1,
                    cells=[sorted(c) for _, c in sorted(tie.cells().items())] if tie else [],
                )
            )
        else:
            excluded.append((name, str(prover.reasons[name])))
    budget.at(f"{len(groups)} prunable groups, {len(excluded)} excluded", 1.0)
    return Analysis(groups=groups, excluded=excluded, lifted=[], probes=prover.probes)
