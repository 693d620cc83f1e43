"""Transposes that move the feature axis out of a Linear's way (MLP-Mixer token mixing).

An MLP-Mixer block mixes tokens with `x + T(token_mlp(T(norm(x))))`, `T` swapping the
token and feature axes: the token MLP's Linears act on the last axis, which after the first
transpose holds tokens, while the residual's features ride along on axis 1. Torch-Pruning
passes channel indices through a transpose unchanged, so it couples the residual's 48
features with the token MLP's 16 token inputs, and the group fails ("channel 44 does not
exist in Linear of width 16"): the residual width of a Mixer could not be pruned, its
LayerNorms and Adds kept full width, and a 0.5 latency target was out of reach.

Here such a transpose becomes `AxisSwap`, a Torch-Pruning custom layer whose input and
output channels are independent (prune_in != prune_out, both leave the layer as it is:
a transpose has no weights). The residual group then ends at each swap, the token MLP
keeps its token width, and the features removed from the stream simply arrive at the
token MLP as a smaller non-feature axis.

A transpose is rewritten only when both sides are unambiguous: its input's last axis holds
features (it comes from a Linear or a LayerNorm, through element-wise ops), the permutation
moves that axis away from last and keeps the batch axis, and every op that reads its
output (again through element-wise ops) is a Linear or a LayerNorm, which read the *new*
last axis. A ConvNeXt permute back to NCHW (read by a Conv) is left alone: there the
identity index map is right. The zero-equivalence probe still proves every group.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx as fx
import torch_pruning as tp
from torch import nn

from engine.fx_util import module_kind, replace_with_module

# Ops that keep every axis where it is and touch each element on its own (activations,
# arithmetic with a constant or with a same-shaped activation: the residual Add).
_ELEMENTWISE = {
    "Add",
    "Sub",
    "Mul",
    "Div",
    "OnnxErf",
    "GELU",
    "ReLU",
    "ReLU6",
    "SiLU",
    "Sigmoid",
    "Tanh",
    "Hardswish",
    "Hardsigmoid",
    "LeakyReLU",
    "ELU",
    "Softplus",
    "Dropout",
    "Identity",
}
_READS_LAST = (nn.Linear, nn.LayerNorm)


class AxisSwap(nn.Module):
    """`x.permute(perm)`; its input and output channels (last axes) are independent."""

    def __init__(self, perm: Sequence[int], in_width: int, out_width: int) -> None:
        super().__init__()
        self.perm = [int(p) for p in perm]
        self.in_width, self.out_width = int(in_width), int(out_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.perm)

    def extra_repr(self) -> str:
        return f"perm={self.perm}"


class AxisSwapPruner(tp.pruner.BasePruningFunc):
    """Distinct no-op in/out functions: a group that reaches the swap stops there."""

    def prune_out_channels(self, layer: AxisSwap, idxs: Sequence[int]) -> AxisSwap:
        layer.out_width -= len(set(int(i) for i in idxs))
        return layer

    def prune_in_channels(self, layer: AxisSwap, idxs: Sequence[int]) -> AxisSwap:
        layer.in_width -= len(set(int(i) for i in idxs))
        return layer

    def get_out_channels(self, layer: AxisSwap) -> int:
        return layer.out_width

    def get_in_channels(self, layer: AxisSwap) -> int:
        return layer.in_width


CUSTOM_PRUNERS = {AxisSwap: AxisSwapPruner()}


def _reads_last(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op != "call_module":
        return False
    mod = gm.get_submodule(str(node.target))
    return isinstance(mod, nn.Linear) or (
        isinstance(mod, nn.LayerNorm) and len(mod.normalized_shape) == 1
    )


def _features_last(gm: fx.GraphModule, node: fx.Node, hops: int = 8) -> bool:
    """Whether `node`'s last axis holds features: a Linear or LayerNorm produced it,
    through element-wise ops only (every activation input of those must agree)."""
    for _ in range(hops):
        if _reads_last(gm, node):
            return True
        if module_kind(gm, node) not in _ELEMENTWISE:
            return False
        acts = [a for a in node.args if isinstance(a, fx.Node) and a.op != "get_attr"]
        if not acts:
            return False
        if len(acts) > 1:
            return all(_features_last(gm, a, hops - 1) for a in acts)
        node = acts[0]
    return False


def _read_by_last_axis_ops(gm: fx.GraphModule, node: fx.Node, limit: int = 64) -> bool:
    """Whether every op that reads `node` (through element-wise ops) reads its last axis."""
    frontier, seen, readers = list(node.users), set(), 0
    while frontier:
        user = frontier.pop()
        if user in seen:
            continue
        seen.add(user)
        if len(seen) > limit:
            return False
        if _reads_last(gm, user):
            readers += 1
        elif module_kind(gm, user) in _ELEMENTWISE:
            frontier.extend(user.users)
        else:
            return False
    return readers > 0


def _width(node: object, axis: int) -> int | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    shape = getattr(meta, "shape", None)
    return int(shape[axis]) if shape is not None and len(shape) > 0 else None


def _moves_last_axis(gm: fx.GraphModule, node: fx.Node) -> list[int] | None:
    """The permutation of an `OnnxTranspose` that keeps the batch axis and moves the last
    one elsewhere (a candidate swap), else None."""
    if module_kind(gm, node) != "OnnxTranspose" or not node.args:
        return None
    perm = list(getattr(gm.get_submodule(str(node.target)), "perm", None) or [])
    if len(perm) < 3 or perm[0] != 0 or perm[-1] == len(perm) - 1:
        return None
    return perm


def has_candidates(gm: fx.GraphModule) -> bool:
    """Whether any transpose could be a swap: without one, load skips the shape pass."""
    return any(_moves_last_axis(gm, n) is not None for n in gm.graph.nodes)


def rewrite_axis_swaps(gm: fx.GraphModule) -> list[str]:
    """Replace the qualifying `OnnxTranspose` nodes (module doc) with `AxisSwap`; returns the
    names of the inserted modules. Needs shapes in `node.meta` (`rewrite_with_shapes`)."""
    done: list[str] = []
    for node in list(gm.graph.nodes):
        # A transpose that leaves the last axis last needs nothing: the identity map is right.
        perm = _moves_last_axis(gm, node)
        src = node.args[0] if perm is not None else None
        if perm is None or not isinstance(src, fx.Node):
            continue
        w_in, w_out = _width(src, -1), _width(node, -1)
        if w_in is None or w_out is None:
            continue
        if not (_features_last(gm, src) and _read_by_last_axis_ops(gm, node)):
            continue
        name = str(node.target).replace(".", "_") + "_axis_swap"
        done.append(replace_with_module(gm, node, name, AxisSwap(perm, w_in, w_out), (src,)))
    return done
