"""FX rewrites of the converted graph before analysis: MatMul with a constant weight lifted
to nn.Linear, Flatten-like Reshapes made batch-polymorphic, per-channel constants and channel
maps (shuffles) made prunable (channel_consts.py, shuffle.py)."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from engine import channel_consts, shuffle
from engine.fx_util import drop_unused_constants, module_kind

# ------------------------------------------------------------------ lifting MatMul → Linear


def _const_of(gm: fx.GraphModule, node: fx.Node | object) -> torch.Tensor | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        obj: object = gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part)
        if isinstance(obj, torch.Tensor):
            return obj
    return None


def lift_linears(gm: fx.GraphModule) -> list[str]:
    """Rewrite `MatMul(x, W_const) [+ b_const]` into `nn.Linear` modules (FX rewrite).

    torch exports every nn.Linear applied to 3-D activations as MatMul + Add with constant
    initialisers; onnx2torch turns those into generic ops over buffers that the pruner
    cannot see. Returns the names of the lifted layers.
    """
    lifted: list[str] = []
    for node in list(gm.graph.nodes):
        if module_kind(gm, node) != "OnnxMatMul" or len(node.args) != 2:
            continue
        x, w_node = node.args
        weight = _const_of(gm, w_node)
        if (
            weight is None
            or weight.dim() != 2
            or _const_of(gm, x) is not None
            or not weight.is_floating_point()
        ):
            continue
        in_f, out_f = weight.shape
        bias = None
        add_node = None
        users = list(node.users)
        if len(users) == 1 and module_kind(gm, users[0]) == "Add" and len(users[0].args) == 2:
            other = users[0].args[1] if users[0].args[0] is node else users[0].args[0]
            b = _const_of(gm, other)
            if (
                b is not None
                and b.numel() == out_f
                and b.shape[-1] == out_f
                and b.is_floating_point()
            ):
                bias, add_node = b.reshape(out_f), users[0]
        linear = nn.Linear(int(in_f), int(out_f), bias=bias is not None)
        with torch.no_grad():
            linear.weight.copy_(weight.t())
            if bias is not None:
                linear.bias.copy_(bias)
        name = str(node.target)
        new_name = (
            name + "_linear" if not name.endswith("MatMul") else name[: -len("MatMul")] + "Linear"
        )
        gm.add_submodule(new_name, linear)
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(new_name, (x,))
        target = add_node if add_node is not None else node
        target.replace_all_uses_with(new)
        lifted.append(new_name)
    if lifted:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
        gm.delete_all_unused_submodules()
        drop_unused_constants(gm)
    return lifted


class _Flatten(nn.Module):
    """Replaces a Reshape whose constant shape [-1, C*H*W] only flattens per sample."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(x, 1)


def rewrite_flatten_reshapes(gm: fx.GraphModule, example: torch.Tensor) -> list[str]:
    """Rewrite constant `Reshape(x, [-1, n])` (n = all of x's non-batch elements) into a
    flatten: the dynamo exporter writes `x.flatten(1)` that way, with the channel count
    baked into the constant, which would make the last conv block unprunable."""
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        ShapeProp(gm).propagate(example)
    except Exception:
        return []
    rewritten: list[str] = []
    for node in list(gm.graph.nodes):
        if module_kind(gm, node) not in ("OnnxReshape",) or len(node.args) != 2:
            continue
        shape = _const_of(gm, node.args[1])
        src = node.args[0]
        meta = src.meta.get("tensor_meta") if isinstance(src, fx.Node) else None
        if shape is None or meta is None or shape.numel() != 2 or len(meta.shape) < 2:
            continue
        first, second = (int(v) for v in shape.tolist())
        rest = 1
        for d in meta.shape[1:]:
            rest *= int(d)
        if first in (-1, 0) and second == rest:
            name = str(node.target) + "_flatten"
            gm.add_submodule(name, _Flatten())
            with gm.graph.inserting_after(node):
                new = gm.graph.call_module(name, (src,))
            node.replace_all_uses_with(new)
            rewritten.append(str(node.target))
    if rewritten:
        gm.graph.eliminate_dead_code()
        gm.recompile()
        gm.delete_all_unused_submodules()
        drop_unused_constants(gm)
    return rewritten


def rewrite_channel_structure(gm: fx.GraphModule, example: torch.Tensor) -> list[str]:
    """Load-time rewrites that make CNN structure prunable; returns notes for the report:
    channel shuffles and constant channel slices (shuffle.py), per-channel constants such
    as layer scale (channel_consts.py)."""
    notes: list[str] = []
    maps = shuffle.rewrite_channel_maps(gm, example)
    shuffles = sum(1 for n in maps if n.endswith("_channel_shuffle"))
    if maps:
        notes.append(
            f"rewrote {shuffles} channel shuffle(s) and {len(maps) - shuffles} constant channel slice(s) "
            "into channel maps that follow pruning"
        )
    scaled = channel_consts.rewrite_channel_constants(gm, example)
    if scaled:
        notes.append(
            f"made {len(scaled)} per-channel constant Mul/Add op(s) (layer scale) prunable with their channels"
        )
    return notes
