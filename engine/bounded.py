"""Analysis that cannot hang: a dependency graph whose group walk is bounded, and a budget
(wall clock, progress, cancel) that every analyse loop checks.

Why: Torch-Pruning's `get_pruning_group` walks the dependency graph until no new
(layer, handler, indices) triple appears, and it compares index lists *in order*. Through a
channel shuffle (Reshape -> Transpose -> Reshape, as every legacy ShuffleNet export has) the
index mapping permutes and re-expands the indices on each turn around the block's
split/concat cycle, so the walk never sees "the same" list twice: on shufflenet_v2_x0_5 it
ran for tens of minutes and grew to 12+ GB, with a quadratic `has_pruning_op` scan on top.
Here the walk de-duplicates by *set* of (index, root index), stops at a hard cap of steps
proportional to the graph size, and checks the analyse budget (deadline and cancel) as it
goes; a group that does not settle is reported, with its layer, instead of hanging.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from numbers import Number
from typing import cast

import torch_pruning as tp
from torch import nn
from torch_pruning import _helpers
from torch_pruning.dependency import index_mapping
from torch_pruning.dependency.dependency import Dependency
from torch_pruning.dependency.group import Group

from core.errors import EngineError

# Steps of one group walk per node of the graph: a well-formed group touches each
# (node, handler) pair a handful of times (residual adds, concat/split re-entries).
STEPS_PER_NODE = 8
# Indices carried by one walk, relative to (nodes x root channels): a shuffle that keeps
# re-expanding its index lists blows through this long before memory is in danger.
ITEMS_PER_NODE = 8
MIN_STEPS, MIN_ITEMS = 64, 1024


class AnalyseTimeout(EngineError):
    code = "analyse_timeout"


class UnboundedGroup(Exception):
    """The channel coupling of one root layer does not settle (raised per group, caught by analyse)."""


class AnalyseBudget:
    """Wall-clock deadline plus a progress/cancel hook, checked often inside analyse.

    `progress(fraction, message)` is the pipeline's reporter: in the worker it raises
    Cancelled, so checking this often is what makes cancel reach the analyse stage.
    """

    def __init__(
        self, seconds: float | None, progress: Callable[[float, str | None], None] | None = None
    ) -> None:
        self.seconds = seconds
        self.deadline = None if not seconds else time.monotonic() + seconds
        self.progress = progress
        self._two_args = progress is not None and _accepts_message(progress)
        self.where = "building the dependency graph"
        self.fraction = 0.0
        self._last_report = 0.0

    def at(self, where: str, fraction: float | None = None) -> None:
        self.where = where
        if fraction is not None:
            self.fraction = fraction
        self.check(force=True)

    def check(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.deadline is not None and now > self.deadline:
            raise AnalyseTimeout(
                f"analyse ran past its budget of {self.seconds:g} s while {self.where}; the model's channel "
                "coupling is too large to prove safe in time: raise the analyse budget "
                "(PRUNERY_ANALYSE_SECONDS) or exclude that layer"
            )
        if self.progress is not None and (force or now - self._last_report > 0.5):
            self._last_report = now
            if self._two_args:
                self.progress(self.fraction, self.where)
            else:
                self.progress(self.fraction)  # type: ignore[call-arg]


def _accepts_message(fn: Callable) -> bool:
    import inspect

    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return True
    return len([p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]) >= 2


class BoundedDependencyGraph(tp.DependencyGraph):
    """tp.DependencyGraph whose `get_pruning_group` is bounded in steps and memory and
    checks `budget` (set by analyse) while it walks."""

    budget: AnalyseBudget | None = None

    # Pruners for single module instances (grouped convs that lose whole blocks, see
    # grouped.py). Torch-Pruning accepts instances in `customized_pruners` but then fails
    # in its tracer (isinstance with an instance) and looks pruners up by type only, so
    # they are kept here and consulted first.
    def __init__(self) -> None:
        super().__init__()
        self.instance_pruners: dict[nn.Module, tp.pruner.function.BasePruningFunc] = {}

    def get_pruner_of_module(self, module: nn.Module):
        own = self.instance_pruners.get(module) if isinstance(module, nn.Module) else None
        return own if own is not None else super().get_pruner_of_module(module)

    def is_out_channel_pruning_fn(self, fn: Callable) -> bool:
        return any(fn == p.prune_out_channels for p in self._instance_kinds()) or (
            super().is_out_channel_pruning_fn(fn)
        )

    def is_in_channel_pruning_fn(self, fn: Callable) -> bool:
        return any(fn == p.prune_in_channels for p in self._instance_kinds()) or (
            super().is_in_channel_pruning_fn(fn)
        )

    def _instance_kinds(self) -> list[tp.pruner.function.BasePruningFunc]:
        return list({id(p): p for p in self.instance_pruners.values()}.values())

    def _name_of(self, module: nn.Module) -> str:
        names = getattr(self, "_module2name", None) or {}
        return names.get(module, type(module).__name__)

    def get_pruning_group(self, module: nn.Module, pruning_fn: Callable, idxs: Sequence[int]):
        if module not in self.module2node:
            raise ValueError(f"Module {module} is not in the dependency graph.")
        if (
            isinstance(module, tp.ops.TORCH_CONV)
            and module.groups == module.out_channels
            and module.out_channels > 1
        ):
            pruning_fn = tp.pruner.function.prune_depthwise_conv_out_channels
        if isinstance(idxs, Number):
            idxs = [cast(int, idxs)]
        idxs = [_helpers._HybridIndex(idx=i, root_idx=i) for i in idxs]
        index_mapping.update_index_mapping(self)
        from engine.shuffle import install_index_maps

        install_index_maps(self)

        group = Group()
        root_node = self.module2node[module]
        root_dep = Dependency(pruning_fn, pruning_fn, source=root_node, target=root_node)
        group.add_dep(dep=root_dep, idxs=idxs)

        n_nodes = max(len(self.module2node), 1)
        max_steps = STEPS_PER_NODE * n_nodes + MIN_STEPS
        max_items = ITEMS_PER_NODE * n_nodes * max(len(idxs), 1) + MIN_ITEMS
        seen: set[tuple[int, int, frozenset]] = {(id(root_node), id(pruning_fn), frozenset(idxs))}
        stack = [(root_dep, idxs)]
        steps, carried = 0, len(idxs)
        while stack:
            dep, cur = stack.pop()
            steps += 1
            if steps > max_steps or carried > max_items:
                raise UnboundedGroup(
                    f"the channel coupling of {self._name_of(module)} does not settle after {steps} steps "
                    f"({carried} indices): a reshape or transpose on its path (such as a channel shuffle) "
                    "keeps re-mapping its channels"
                )
            if self.budget is not None and steps % 64 == 0:
                self.budget.check()
            node, fn = dep.target, dep.handler
            for new_dep in node.dependencies:
                if not new_dep.is_triggered_by(fn):
                    continue
                new_idxs = cur
                for mapping in new_dep.index_mapping:
                    if mapping is not None:
                        new_idxs = mapping(new_idxs)
                if len(new_idxs) == 0:
                    continue
                key = (id(new_dep.target), id(new_dep.handler), frozenset(new_idxs))
                if key in seen:
                    continue
                seen.add(key)
                group.add_dep(new_dep, new_idxs)
                carried += len(new_idxs)
                stack.append((new_dep, new_idxs))

        merged = Group()
        for dep, item_idxs in group.items:
            if isinstance(dep.target.module, nn.Parameter) and any(
                dep.target.module is p for p in self.ignored_params
            ):
                continue
            merged.add_and_merge(dep, item_idxs)
        merged._DG = self
        for i in range(len(merged)):
            hybrid = merged[i].idxs
            merged[i] = _helpers.GroupItem(merged[i].dep, _helpers.to_plain_idxs(hybrid))
            merged[i].root_idxs = _helpers.to_root_idxs(hybrid)
        return merged
