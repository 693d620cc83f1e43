"""Channel shuffle and constant channel slices as channel maps the pruner understands.

A legacy ShuffleNet export writes its channel shuffle as Reshape [B, g, C/g, H, W] ->
Transpose(0, 2, 1, 3, 4) -> Reshape [B, C, H, W] with the channel counts baked into
constants, and its `chunk(2)` as two Slices with constant bounds. Torch-Pruning reads the
Reshapes as a flatten (one channel -> H*W indices), so its group walk kept re-expanding
indices around each block (the 12 GB "hang"), and the constant bounds could not follow a
pruned width. Here:

* the Reshape -> Transpose -> Reshape triple becomes `ChannelPermute` (out[:, j] =
  in[:, perm[j]]): a permutation of channels, so any set of removed channels stays valid —
  the permutation is re-indexed over the kept channels (a shuffle again when the removal is
  balanced, a Gather otherwise);
* a constant Slice over the channel axis becomes `ChannelSlice(start, end)`, whose bounds
  shift down by the removed channels below them.

Both are Torch-Pruning custom layers whose input and output channels are coupled
(prune_in == prune_out); `install_index_maps` gives their graph edges the index maps
(input space <-> output space) so a group walks through them exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

import torch
import torch.fx as fx
import torch_pruning as tp
from torch import nn
from torch_pruning import _helpers

from engine.converters import OnnxSliceStatic
from engine.fx_util import constant_of, replace_with_module, rewrite_with_shapes


def _shuffle_groups(perm: torch.Tensor) -> int:
    """g when perm is the channel shuffle with g groups, else 0."""
    c = perm.numel()
    for g in range(2, c):
        if c % g == 0 and torch.equal(perm, torch.arange(c).view(g, c // g).t().reshape(-1)):
            return g
    return 0


class ChannelPermute(nn.Module):
    """out[:, j] = in[:, perm[j]] (a channel shuffle when `groups` > 0)."""

    perm: torch.Tensor

    def __init__(self, perm: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("perm", perm.to(torch.long).clone())
        self.groups = _shuffle_groups(self.perm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.perm.numel()
        # The reshape/transpose form exports as the original shuffle; with autograd on (the
        # pruner's trace, training) one index_select keeps the traced graph a single node.
        if self.groups and not torch.is_grad_enabled():
            b, rest = x.shape[0], x.shape[2:]
            return (
                x.reshape(b, self.groups, c // self.groups, *rest)
                .transpose(1, 2)
                .reshape(b, c, *rest)
            )
        return torch.index_select(x, 1, self.perm)


class ChannelSlice(nn.Module):
    """x[:, start:end] with bounds that follow pruning."""

    def __init__(self, start: int, end: int, width: int) -> None:
        super().__init__()
        self.start, self.end, self.width = int(start), int(end), int(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.start : self.end]


class ChannelPermutePruner(tp.pruner.BasePruningFunc):
    def prune_out_channels(self, layer: ChannelPermute, idxs: Sequence[int]) -> ChannelPermute:
        # idxs are input channels (the walk keeps this layer's indices in input space).
        removed = set(int(i) for i in idxs)
        perm = layer.perm.tolist()
        kept_in = [i for i in range(len(perm)) if i not in removed]
        rank = {old: new for new, old in enumerate(kept_in)}
        new = torch.as_tensor(
            [rank[p] for p in perm if p not in removed], dtype=torch.long, device=layer.perm.device
        )
        layer.perm = new
        layer.groups = _shuffle_groups(new.cpu())
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: ChannelPermute) -> int:
        return int(layer.perm.numel())

    get_in_channels = get_out_channels


class ChannelSlicePruner(tp.pruner.BasePruningFunc):
    def prune_out_channels(self, layer: ChannelSlice, idxs: Sequence[int]) -> ChannelSlice:
        removed = [int(i) for i in set(idxs)]
        layer.start -= sum(1 for i in removed if i < layer.start)
        layer.end -= sum(1 for i in removed if i < layer.end)
        layer.width -= len(removed)
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: ChannelSlice) -> int:
        return layer.end - layer.start

    def get_in_channels(self, layer: ChannelSlice) -> int:
        return layer.width


CUSTOM_PRUNERS = {ChannelPermute: ChannelPermutePruner(), ChannelSlice: ChannelSlicePruner()}


# ------------------------------------------------------------------ index maps on graph edges


class _Map:
    """An index map on one dependency edge: ours composed with what Torch-Pruning set."""

    def __init__(self, base: Callable | None, ours: Callable, ours_first: bool) -> None:
        self.base, self.ours, self.ours_first = base, ours, ours_first

    def __call__(self, idxs):
        if self.ours_first:
            idxs = self.ours(idxs)
            return self.base(idxs) if self.base is not None else idxs
        idxs = self.base(idxs) if self.base is not None else idxs
        return self.ours(idxs)


def _remap(table: Callable[[int], int | None]) -> Callable:
    def apply(idxs):
        out = []
        for i in idxs:
            j = table(i.idx)
            if j is not None:
                out.append(_helpers._HybridIndex(idx=j, root_idx=i.root_idx))
        return out

    return apply


def _in_to_out(module: nn.Module) -> Callable:
    if isinstance(module, ChannelPermute):
        inv = {int(p): j for j, p in enumerate(module.perm.tolist())}
        return _remap(inv.get)
    assert isinstance(module, ChannelSlice)
    s, e = module.start, module.end
    return _remap(lambda i: i - s if s <= i < e else None)


def _out_to_in(module: nn.Module) -> Callable:
    if isinstance(module, ChannelPermute):
        perm = module.perm.tolist()
        return _remap(lambda j: int(perm[j]) if 0 <= j < len(perm) else None)
    assert isinstance(module, ChannelSlice)
    s, e = module.start, module.end
    return _remap(lambda j: j + s if 0 <= j < e - s else None)


def _base(slot):
    return slot.base if isinstance(slot, _Map) else slot


def install_index_maps(dg: tp.DependencyGraph) -> None:
    """Give the edges on the output side of every ChannelPermute/ChannelSlice their index
    map (called after Torch-Pruning refreshes its own maps, before every group walk)."""
    for module, node in dg.module2node.items():
        if not isinstance(module, (ChannelPermute, ChannelSlice)):
            continue
        fwd, back = _in_to_out(module), _out_to_in(module)
        outs = set(id(n) for n in node.outputs)
        for dep in node.dependencies:
            if id(dep.target) in outs:
                dep.index_mapping[0] = _Map(_base(dep.index_mapping[0]), fwd, ours_first=True)
        for out in node.outputs:
            for dep in out.dependencies:
                if dep.target is node:
                    dep.index_mapping[1] = _Map(_base(dep.index_mapping[1]), back, ours_first=False)


# ------------------------------------------------------------------ FX rewrites


def _kind(gm: fx.GraphModule, node: object) -> str:
    if not isinstance(node, fx.Node) or node.op != "call_module":
        return ""
    return type(gm.get_submodule(str(node.target))).__name__


def _shape(node: object) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return (
        tuple(int(d) for d in meta.shape) if meta is not None and hasattr(meta, "shape") else None
    )


def _split_to_slices(gm: fx.GraphModule, node: fx.Node) -> list[str]:
    """A Split over channels (sizes baked in, or `num_outputs` equal parts) -> one
    ChannelSlice per used output, so each part keeps its own channels after pruning."""
    import operator

    src = node.args[0] if node.args else None
    s_in = _shape(src)
    metas = node.meta.get("tensor_meta")
    if s_in is None or len(s_in) < 2 or not isinstance(metas, (tuple, list)) or not metas:
        return []
    shapes = [tuple(int(d) for d in m.shape) for m in metas if hasattr(m, "shape")]
    if len(shapes) != len(metas) or any(len(sh) != len(s_in) for sh in shapes):
        return []
    if (
        any(sh[k] != s_in[k] for sh in shapes for k in range(len(s_in)) if k != 1)
        or sum(sh[1] for sh in shapes) != s_in[1]
    ):
        return []
    users = list(node.users)
    if not users or any(
        u.op != "call_function"
        or u.target is not operator.getitem
        or not isinstance(u.args[1], int)
        for u in users
    ):
        return []
    offsets = [0]
    for sh in shapes:
        offsets.append(offsets[-1] + sh[1])
    names = []
    for u in users:
        k = int(cast(int, u.args[1]))  # checked above: every user is getitem with an int
        name = f"{str(node.target).replace('.', '_')}_channel_slice_{k}"
        piece = ChannelSlice(offsets[k], offsets[k + 1], s_in[1])
        names.append(replace_with_module(gm, u, name, piece, (src,)))
    return names


def _shuffle_to_permute(gm: fx.GraphModule, node: fx.Node) -> list[str]:
    """Reshape [B,C,*S] -> [B,g,C/g,*S] -> Transpose(0,2,1,...) -> Reshape [B,C,*S]."""
    if len(node.users) != 1:
        return []
    src = node.args[0]
    t = next(iter(node.users))
    s_in, s_mid = _shape(src), _shape(node)
    if (
        s_in is None
        or s_mid is None
        or len(s_in) < 3
        or len(s_mid) != len(s_in) + 1
        or _kind(gm, t) != "OnnxTranspose"
        or len(t.users) != 1
    ):
        return []
    perm_t = list(getattr(gm.get_submodule(str(t.target)), "perm", []) or [])
    r2 = next(iter(t.users))
    if _kind(gm, r2) != "OnnxReshape" or _shape(r2) != s_in:
        return []
    b, c, rest = s_in[0], s_in[1], s_in[2:]
    g = s_mid[1]
    if (
        perm_t != [0, 2, 1, *range(3, len(s_mid))]
        or s_mid != (b, g, c // g, *rest)
        or g * (c // g) != c
    ):
        return []
    name = str(r2.target).replace(".", "_") + "_channel_shuffle"
    perm = torch.arange(c).view(g, c // g).t().reshape(-1)
    return [replace_with_module(gm, r2, name, ChannelPermute(perm), (src,))]


def _slice_to_channel_slice(gm: fx.GraphModule, node: fx.Node) -> list[str]:
    """A constant Slice of the channel dimension (one range, step 1)."""
    src = node.args[0] if node.args else None
    s_in, s_out = _shape(src), _shape(node)
    if s_in is None or s_out is None or len(s_in) < 2 or len(s_in) != len(s_out):
        return []
    if (
        any(a != b for k, (a, b) in enumerate(zip(s_in, s_out, strict=True)) if k != 1)
        or s_in[1] == s_out[1]
    ):
        return []
    mod = gm.get_submodule(str(node.target))
    if isinstance(mod, OnnxSliceStatic):  # converters.py: constants kept as ints
        starts, axes, steps = mod.starts, mod.axes, mod.steps
    else:
        maybe_consts = [constant_of(gm, a) for a in node.args[1:]]
        consts = [c for c in maybe_consts if c is not None]
        if len(maybe_consts) < 2 or len(consts) != len(maybe_consts):
            return []
        starts = consts[0].flatten().tolist()
        axes = consts[2].flatten().tolist() if len(consts) > 2 else list(range(len(starts)))
        steps = consts[3].flatten().tolist() if len(consts) > 3 else [1] * len(starts)
    if len(starts) != 1 or int(steps[0]) != 1 or int(axes[0]) not in (1, 1 - len(s_in)):
        return []
    width = s_in[1]
    start = int(starts[0]) + (width if int(starts[0]) < 0 else 0)
    start = max(0, min(start, width))
    end = start + s_out[1]
    name = str(node.target).replace(".", "_") + "_channel_slice"
    return [replace_with_module(gm, node, name, ChannelSlice(start, end, width), (src,))]


def _rewrite_maps(gm: fx.GraphModule) -> list[str]:
    done: list[str] = []
    for node in list(gm.graph.nodes):
        kind = _kind(gm, node)
        if kind == "OnnxReshape":
            done.extend(_shuffle_to_permute(gm, node))
        elif kind in ("_SplitEqual", "OnnxSplit", "OnnxSplit13"):
            done.extend(_split_to_slices(gm, node))
        elif kind in ("OnnxSlice", "OnnxSliceV9", "OnnxSliceStatic"):
            done.extend(_slice_to_channel_slice(gm, node))
    return done


def rewrite_channel_maps(gm: fx.GraphModule, example: torch.Tensor) -> list[str]:
    """Rewrite channel shuffles and constant channel slices (see module doc)."""
    return rewrite_with_shapes(gm, example, _rewrite_maps)
