"""Per-channel constants (layer scale) as prunable layers.

A `Mul`/`Add`/`Sub`/`Div` of an activation by a constant of shape [C], [C,1,1] or
[1,C,1,1] (ConvNeXt's layer scale, a folded affine, a per-channel offset) converts through
onnx2torch into a generic binary op over a buffer. Torch-Pruning cannot see that buffer, so
removing channels of the residual stream left the constant at its old width ("size of
tensor a (768) must match ... (766)") and every such group was excluded. Here each such op
becomes a `ChannelConstant` module holding the constant as a parameter, with a
Torch-Pruning pruner that slices it together with the channels it multiplies: it is
coupled in = out (like BatchNorm), so the constant travels with the group. It exports as
the same elementwise op, so the pruned ONNX graph and its MAC count keep the original form.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx as fx
import torch_pruning as tp
from torch import nn

from engine.fx_util import constant_of, module_kind, rewrite_with_shapes

_OPS = {"Mul", "Add", "Sub", "Div"}


class ChannelConstant(nn.Module):
    """y = x (op) value, value broadcast along one channel dim of x (dim 1, or the last dim)."""

    def __init__(
        self, op: str, value: torch.Tensor, channel_last: bool, const_first: bool = False
    ) -> None:
        super().__init__()
        self.op = op
        self.channel_last = channel_last
        self.const_first = const_first
        self.weight = nn.Parameter(value.detach().clone(), requires_grad=False)

    @property
    def channels(self) -> int:
        return int(self.weight.shape[-1] if self.channel_last else self.weight.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.weight
        a, b = (v, x) if self.const_first else (x, v)
        if self.op == "Mul":
            return a * b
        if self.op == "Add":
            return a + b
        if self.op == "Sub":
            return a - b
        return a / b


class ChannelConstantPruner(tp.pruner.BasePruningFunc):
    """Slices the constant with the channels of its input (in and out are the same channels)."""

    def prune_out_channels(self, layer: ChannelConstant, idxs: Sequence[int]) -> ChannelConstant:
        dim = layer.weight.dim() - 1 if layer.channel_last else 0
        keep = sorted(set(range(layer.channels)) - set(int(i) for i in idxs))
        index = torch.as_tensor(keep, dtype=torch.long, device=layer.weight.device)
        layer.weight = nn.Parameter(
            torch.index_select(layer.weight.data, dim, index), requires_grad=False
        )
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: ChannelConstant) -> int:
        return layer.channels

    def get_in_channels(self, layer: ChannelConstant) -> int:
        return layer.channels


CUSTOM_PRUNERS = {ChannelConstant: ChannelConstantPruner()}


def _per_channel(value: torch.Tensor, shape: Sequence[int]) -> tuple[torch.Tensor, bool] | None:
    """(value in a canonical shape, channel_last) when `value` varies along one channel dim only."""
    if len(shape) < 2 or not value.is_floating_point():
        return None
    c1, clast = int(shape[1]), int(shape[-1])
    v = value
    while v.dim() > 1 and v.shape[0] == 1:  # leading broadcast ones: [1,C,1,1] -> [C,1,1]
        v = v.squeeze(0)
    if v.numel() <= 1:
        return None
    trailing = len(shape) - 2
    if v.dim() == trailing + 1 and v.shape[0] == c1 and all(d == 1 for d in v.shape[1:]) and c1 > 1:
        return v, False
    if v.dim() == 1 and v.shape[0] == clast and clast > 1 and len(shape) in (2, 3):
        return v, True
    return None


def rewrite_channel_constants(gm: fx.GraphModule, example: torch.Tensor) -> list[str]:
    """Replace per-channel constant binary ops by ChannelConstant modules; returns their names."""
    return rewrite_with_shapes(gm, example, _rewrite_constants)


def _rewrite_constants(gm: fx.GraphModule) -> list[str]:
    rewritten: list[str] = []
    for node in list(gm.graph.nodes):
        kind = module_kind(gm, node)
        if kind not in _OPS or len(node.args) != 2 or node.kwargs:
            continue
        a, b = node.args
        const_first = constant_of(gm, a) is not None
        x, c = (b, a) if const_first else (a, b)
        value = constant_of(gm, c)
        if value is None or not isinstance(x, fx.Node) or constant_of(gm, x) is not None:
            continue
        if const_first and kind in ("Sub", "Div"):
            continue  # c - x and c / x are not channel-separable scalings we slice here
        meta = x.meta.get("tensor_meta")
        out_meta = node.meta.get("tensor_meta")
        if meta is None or out_meta is None or tuple(meta.shape) != tuple(out_meta.shape):
            continue
        found = _per_channel(value, list(meta.shape))
        if found is None:
            continue
        v, channel_last = found
        name = str(node.target).replace(".", "_") + "_channel_constant"
        gm.add_submodule(name, ChannelConstant(kind, v, channel_last, const_first))
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(name, (x,))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        rewritten.append(name)
    return rewritten
