"""Where a group's root channels live in each layer, for methods that act on channels
without removing them (ANP's beta-Bernoulli masks, SANP's per-sample gates).

Torch-Pruning's group items give, for every coupled layer, the layer's own channel
indices (`item.idxs`) and the root channels they correspond to (`item.root_idxs`). A
multiplicative factor per root channel is applied to a layer's outputs through the
constant 0/1 matrix P[root, channel] (or a plain gather when the layer's channels are
the root's channels in some order): factor_layer = f_root @ P + (1 - P.sum(0)), so
channels outside the group keep factor 1.

Masking every out-pruned Conv/Linear of a group with factor 0 is exactly what the
engine's zero-equivalence probe proved equal to removing those channels, so a mask of 0
*is* a removal, and in-pruned layers then see zeros on those input channels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from workers.engine.graph import PRUNABLE_ROOTS, ChannelGroup, full_group


@dataclass
class ChannelMap:
    """Root channels `roots[k]` of a group are channels `idxs[k]` of `module`."""

    module: str
    width: int  # the layer's channel count on this side (out or in)
    idxs: torch.Tensor
    roots: torch.Tensor

    def is_identity(self, root_channels: int) -> bool:
        return self.width == root_channels and torch.equal(self.idxs, torch.arange(self.width)) and torch.equal(
            self.roots, torch.arange(root_channels)
        )

    def is_gather(self) -> bool:
        """Every channel of the layer belongs to the group, one root each (a permutation)."""
        return len(self.idxs) == self.width and torch.equal(torch.sort(self.idxs).values, torch.arange(self.width))

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
    return module.out_channels if role == "out" else module.in_channels  # type: ignore[union-attr]


def group_channels(model: nn.Module, dg, groups: list[ChannelGroup]) -> list[GroupChannels]:
    """The out/in channel maps of every group's Conv/Linear members."""
    names = {m: n for n, m in model.named_modules()}
    result: list[GroupChannels] = []
    for g in groups:
        group = full_group(model, dg, g.name)
        maps: dict[tuple[str, str], list[tuple[list[int], list[int]]]] = {}
        for item in group:
            target = item.dep.target.module
            if not isinstance(target, PRUNABLE_ROOTS) or target not in names:
                continue
            role = "out" if dg.is_out_channel_pruning_fn(item.dep.handler) else "in"
            maps.setdefault((names[target], role), []).append((list(item.idxs), list(item.root_idxs)))
        gc = GroupChannels(g.name, g.channels)
        for (name, role), parts in maps.items():
            pairs = sorted({(i, r) for idxs, roots in parts for i, r in zip(idxs, roots, strict=True)})
            module = model.get_submodule(name)
            cmap = ChannelMap(
                name,
                _width(module, role),
                torch.tensor([i for i, _ in pairs], dtype=torch.long),
                torch.tensor([r for _, r in pairs], dtype=torch.long),
            )
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
