"""Channel groups and their surgery: Torch-Pruning's dependency graph (bounded walk), the
coupled group of a root layer, zeroing and removing its channels, per-channel scores."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from engine import axis_swap, channel_consts, grouped, shuffle
from engine.bounded import BoundedDependencyGraph
from engine.channels import group_layers

PRUNABLE_ROOTS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def build_dependency_graph(model: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph, with a bounded group walk (see bounded.py), the
    pruner that slices per-channel constants (channel_consts.py) and whole-block pruning of
    grouped convs (grouped.py)."""
    pruners: dict[Any, Any] = {
        **channel_consts.CUSTOM_PRUNERS,
        **shuffle.CUSTOM_PRUNERS,
        **axis_swap.CUSTOM_PRUNERS,
    }
    dg = BoundedDependencyGraph()
    dg.instance_pruners = dict(grouped.block_pruners(model))
    with torch.enable_grad():
        return dg.build_dependency(
            model,
            example_inputs=example,
            verbose=False,
            customized_pruners=pruners,
        )


@dataclass
class GroupMember:
    name: str
    op: str
    role: str  # "out" (its output channels go) or "in" (its input channels go)


@dataclass
class ChannelGroup:
    """A set of coupled channels that must be removed together, named by its root layer.

    `quantum`: channels go in multiples of it (a grouped conv's block or offset, grouped.py);
    `cells`: those units as root-index lists (empty when any channel can go alone)."""

    name: str
    channels: int
    members: list[GroupMember] = field(default_factory=list)
    quantum: int = 1
    cells: list[list[int]] = field(default_factory=list, repr=False)

    @property
    def out_layers(self) -> list[str]:
        return [m.name for m in self.members if m.role == "out"]


def module_names(model: nn.Module) -> dict[nn.Module, str]:
    return {m: n for n, m in model.named_modules()}


def _root_pruning_fn(dg: tp.DependencyGraph, module: nn.Module) -> Callable:
    return dg.get_pruner_of_module(module).prune_out_channels


def grouped_ties(model: nn.Module, dg: tp.DependencyGraph, root: str) -> list[grouped.GroupedTie]:
    """The grouped convs that the group of `root` passes through (cached on the graph)."""
    cache = dg.__dict__.setdefault("_prunery_ties", {})
    if root not in cache:
        module = model.get_submodule(root)
        everything = list(range(dg.get_out_channels(module)))
        full = dg.get_pruning_group(module, _root_pruning_fn(dg, module), everything)
        cache[root] = grouped.ties_of(dg, full, module_names(model))
    return cache[root]


def full_group(
    model: nn.Module,
    dg: tp.DependencyGraph,
    root: str,
    idxs: Sequence[int] | None = None,
    minimum: int = 0,
):
    """The pruning group of `root` for `idxs` (all channels when None). Indices are projected
    so that grouped convolutions lose the same offsets in every block (grouped.py)."""
    module = model.get_submodule(root)
    if idxs is None:
        idxs = list(range(dg.get_out_channels(module)))
    else:
        ties = (
            grouped_ties(model, dg, root)
            if any(grouped.is_grouped(m) for m in model.modules())
            else []
        )
        if ties:
            idxs = grouped.project(ties, idxs, minimum=minimum)
    return dg.get_pruning_group(module, _root_pruning_fn(dg, module), list(idxs))


def zero_out_channels(dg: tp.DependencyGraph, group) -> None:
    """Zero what removing the group's channels removes: out-channel weights and biases."""
    with torch.no_grad():
        for item in group:
            dep, idxs = item.dep, item.idxs
            if not dg.is_out_channel_pruning_fn(dep.handler):
                continue
            target = dep.target.module
            idx = torch.as_tensor(list(idxs), dtype=torch.long)
            if isinstance(target, nn.Parameter):
                dim = (
                    dg.unwrapped_parameters.get(target, None)
                    if isinstance(dg.unwrapped_parameters, dict)
                    else None
                )
                if dim is None:
                    for p, d in getattr(dg, "unwrapped_parameters", []) or []:
                        if p is target:
                            dim = d
                if dim is not None:
                    target.index_fill_(dim, idx, 0.0)
                continue
            if isinstance(target, (nn.Embedding,)):
                target.weight[:, idx] = 0.0
                continue
            if isinstance(target, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
                target.weight[:, idx] = 0.0
                if target.bias is not None:
                    target.bias[idx] = 0.0
                continue
            weight = getattr(target, "weight", None)
            if (
                isinstance(weight, torch.Tensor)
                and weight.dim() >= 1
                and int(idx.max()) >= weight.shape[0]
            ):
                raise IndexError(
                    f"channel {int(idx.max())} does not exist in {type(target).__name__} of width {weight.shape[0]}"
                )
            if isinstance(weight, torch.Tensor) and weight.dim() >= 1:
                weight[idx] = 0.0
            bias = getattr(target, "bias", None)
            if isinstance(bias, torch.Tensor):
                bias[idx] = 0.0


def describe_group(
    model: nn.Module, dg: tp.DependencyGraph, group, names: dict[nn.Module, str]
) -> list[GroupMember]:
    members: list[GroupMember] = []
    seen: set[tuple[str, str]] = set()
    for layer in group_layers(dg, group, names):
        if layer.name is None or (layer.name, layer.role) in seen:
            continue
        seen.add((layer.name, layer.role))
        members.append(GroupMember(layer.name, type(layer.module).__name__, layer.role))
    return members


def prune_copy(
    model: nn.Module, example: torch.Tensor, plan: Mapping[str, Sequence[int]]
) -> nn.Module:
    """A structurally pruned deep copy: plan = {group root: root-channel indices to remove}."""
    from engine import heads

    m = copy.deepcopy(model)
    todo: dict[str, Sequence[int]] = {
        k: sorted(set(int(i) for i in v)) for k, v in plan.items() if len(v)
    }
    todo = heads.apply_plan(m, todo, heads.blocks_of(model))  # attention heads: heads.py
    if not todo:
        return m
    dg = build_dependency_graph(m, example)
    for root, idxs in todo.items():
        full_group(m, dg, root, idxs).prune()
    return m


def channel_scores(
    model: nn.Module,
    dg: tp.DependencyGraph,
    root: str,
    per_module: Callable[[nn.Module], torch.Tensor | None],
) -> torch.Tensor:
    """Sum a per-output-channel statistic over every out-pruned layer of a group, in the
    root's channel order (coupled channels of residual/concat groups are scored together)."""
    from engine import heads

    if heads.is_head_group(root):
        return heads.head_scores(model, root, per_module)
    group = full_group(model, dg, root)
    n = len(group[0].idxs)
    total = torch.zeros(n, dtype=torch.float64)
    for layer in group_layers(dg, group):
        if layer.role != "out" or (values := per_module(layer.module)) is None:
            continue
        idxs = torch.as_tensor(layer.idxs, dtype=torch.long)
        roots = torch.as_tensor(layer.roots, dtype=torch.long)
        total.index_add_(0, roots, values.detach().double().cpu()[idxs])
    return total
