"""Channels of a group, layer by layer, and the one channel-gate hook.

Torch-Pruning's group items give, for every coupled layer, the layer's own channel
indices (`item.idxs`) and the root channels they correspond to (`item.root_idxs`).

* `group_layers(dg, group, names)`: that walk, once — one `LayerChannels` per item (layer,
  role "out"/"in", idxs, roots). `graph.describe_group`, `graph.channel_scores`, the
  reconstruction methods' consumers and `layer_maps` are built on it.
* `layer_maps` / `group_channels`: the per-layer `ChannelMap` of a group (items of one
  layer and role merged), for methods that act on channels without removing them (gates,
  masks, learned widths, width costs).
* `gate_output`: the one forward hook that multiplies a layer's output channels by a gate
  ([C] or per sample [B, C]), moved to the output's device (gradients reach the gate).

A multiplicative factor per root channel is applied to a layer's outputs through the
constant 0/1 matrix P[root, channel] (or a plain gather when the layer's channels are
the root's channels in some order): factor_layer = f_root @ P + (1 - P.sum(0)), so
channels outside the group keep factor 1.

Masking every out-pruned Conv/Linear of a group with factor 0 is exactly what the
engine's zero-equivalence probe proved equal to removing those channels, so a mask of 0
*is* a removal, and in-pruned layers then see zeros on those input channels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

if TYPE_CHECKING:
    from engine.graph import ChannelGroup

# engine.graph is imported inside the functions that need it, so that graph itself can
# build on `group_layers` (describe_group, channel_scores) without an import cycle.


@dataclass
class LayerChannels:
    """One item of a group: root channels `roots[k]` are channels `idxs[k]` of `module`
    on its `role` side ("out": its output channels go; "in": its input channels go).
    `name` is the module's name in the model, None when `names` did not know it."""

    module: nn.Module
    name: str | None
    role: str
    idxs: list[int]
    roots: list[int]


def group_layers(
    dg: Any, group: Iterable[Any], names: dict[nn.Module, str] | None = None
) -> list[LayerChannels]:
    """Every item of a Torch-Pruning group whose target is an nn.Module, in group order
    (one entry per item: a layer may appear more than once)."""
    layers: list[LayerChannels] = []
    for item in group:
        target = item.dep.target.module
        if not isinstance(target, nn.Module):
            continue
        role = "out" if dg.is_out_channel_pruning_fn(item.dep.handler) else "in"
        name = names.get(target) if names is not None else None
        layers.append(
            LayerChannels(
                target, name, role, [int(i) for i in item.idxs], [int(r) for r in item.root_idxs]
            )
        )
    return layers


@dataclass
class ChannelMap:
    """Root channels `roots[k]` of a group are channels `idxs[k]` of `module`."""

    module: str
    width: int  # the layer's channel count on this side (out or in)
    idxs: torch.Tensor
    roots: torch.Tensor

    def is_identity(self, root_channels: int) -> bool:
        return (
            self.width == root_channels
            and torch.equal(self.idxs, torch.arange(self.width))
            and torch.equal(self.roots, torch.arange(root_channels))
        )

    def is_gather(self) -> bool:
        """Every channel of the layer belongs to the group, one root each (a permutation)."""
        return len(self.idxs) == self.width and torch.equal(
            torch.sort(self.idxs).values, torch.arange(self.width)
        )

    def gather_index(self) -> torch.Tensor:
        """index such that factor_layer = factor_root[..., index] (valid when is_gather())."""
        index = torch.empty(self.width, dtype=torch.long)
        index[self.idxs] = self.roots
        return index

    def projection(self, root_channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(P [root, width], base [width]) with factor_layer = factor_root @ P + base."""
        p = torch.zeros(root_channels, self.width)
        p[self.roots, self.idxs] = 1.0
        base = (p.sum(0) == 0).float()
        return p, base


@dataclass
class GroupChannels:
    name: str
    channels: int
    outs: list[ChannelMap] = field(default_factory=list)  # out-pruned Conv/Linear members
    ins: list[ChannelMap] = field(default_factory=list)  # in-pruned Conv/Linear members


def _width(module: nn.Module, role: str) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features if role == "out" else module.in_features
    return module.out_channels if role == "out" else module.in_channels  # type: ignore[return-value]


def layer_maps(model: nn.Module, dg: Any, root: str) -> list[tuple[str, ChannelMap]]:
    """(role, map) of every named Conv/Linear (graph.PRUNABLE_ROOTS) in the group of `root`,
    the items of one layer and role merged (unique (idx, root) pairs, sorted by idx)."""
    from engine.graph import PRUNABLE_ROOTS, full_group

    names = {m: n for n, m in model.named_modules()}
    merged: dict[tuple[str, str], set[tuple[int, int]]] = {}
    for lc in group_layers(dg, full_group(model, dg, root), names):
        if isinstance(lc.module, PRUNABLE_ROOTS) and lc.name is not None:
            pairs = merged.setdefault((lc.name, lc.role), set())
            pairs.update(zip(lc.idxs, lc.roots, strict=True))
    maps: list[tuple[str, ChannelMap]] = []
    for (name, role), pairs in merged.items():
        ordered = sorted(pairs)
        cmap = ChannelMap(
            name,
            _width(model.get_submodule(name), role),
            torch.tensor([i for i, _ in ordered], dtype=torch.long),
            torch.tensor([r for _, r in ordered], dtype=torch.long),
        )
        maps.append((role, cmap))
    return maps


def group_channels(model: nn.Module, dg: Any, groups: list[ChannelGroup]) -> list[GroupChannels]:
    """The out/in channel maps of every group's Conv/Linear members (groups with no
    out-pruned Conv/Linear are left out)."""
    result: list[GroupChannels] = []
    for g in groups:
        gc = GroupChannels(g.name, g.channels)
        for role, cmap in layer_maps(model, dg, g.name):
            (gc.outs if role == "out" else gc.ins).append(cmap)
        if gc.outs:
            result.append(gc)
    return result


def channel_dim(module: nn.Module) -> int:
    """The channel dimension of the layer's output: 1 for convs, -1 for Linear."""
    return -1 if isinstance(module, nn.Linear) else 1


def broadcast_factor(factor: torch.Tensor, output: torch.Tensor, dim: int) -> torch.Tensor:
    """Shape a per-channel factor ([C] or per sample [B, C]) to multiply `output`."""
    if dim == -1:
        if factor.dim() == 1:
            return factor
        shape = [factor.shape[0]] + [1] * (output.dim() - 2) + [factor.shape[1]]
        return factor.reshape(shape)
    if factor.dim() == 1:
        return factor.reshape([1, -1] + [1] * (output.dim() - 2))
    return factor.reshape(list(factor.shape) + [1] * (output.dim() - 2))


GateFn = Callable[[torch.Tensor], torch.Tensor | None]
"""output -> the factor of its channels ([C] or per sample [B, C]); None leaves it as is."""


def gate_output(module: nn.Module, gate: GateFn) -> RemovableHandle:
    """The one channel-gate hook: a forward hook returning `output * gate(output)` along the
    module's channel dimension (1 for convs, -1 for Linear). The factor is moved to the
    output's device: gates may live elsewhere than the layer (a method's parameters are
    created on ctx.device); the copy is differentiable, so gradients reach the gates."""

    def hook(m: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        factor = gate(output)
        if factor is None:
            return output
        return output * broadcast_factor(factor.to(output.device), output, channel_dim(m))

    return module.register_forward_hook(hook)
