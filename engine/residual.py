"""The residual/embedding width of a transformer as one prunable group.

In a converted transformer the residual stream's width is tied to constants that
Torch-Pruning cannot see: the class token and the positional embedding are ONNX
initialisers (buffers after conversion, not parameters), and the stream runs through
Reshapes (`[B, E, h, w] -> [B, E, h*w]`, `[T*B, E] -> [T, B, E]`). `reshapes.StaticReshape`
already copies dims that a Reshape leaves alone from its input at run time; this module
turns the embedding constants into parameters, so that the dependency graph couples them
with every LayerNorm, every projection into and out of the stream and the patch-embedding
conv — one group that the zero-equivalence probe then proves or excludes like any other.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

_JOIN = ("Add", "OnnxConcat", "BatchConcat")


def _kind(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op != "call_module":
        return ""
    mod = gm.get_submodule(str(node.target))
    kind = type(mod).__name__
    if kind == "OnnxBinaryMathOperation":
        ops: dict[object, str] = {torch.add: "Add", torch.sub: "Sub", torch.mul: "Mul"}
        return ops.get(getattr(mod, "math_op_function", None), "Div")
    return kind


def _near_attention_logits(gm: fx.GraphModule, node: fx.Node, hops: int = 4) -> bool:
    """Whether `node` is (a few layout ops after) an activation x activation MatMul: masks and
    relative-position biases are added there, and they are not embeddings."""
    frontier = [node]
    for _ in range(hops):
        nxt: list[fx.Node] = []
        for n in frontier:
            if not isinstance(n, fx.Node):
                continue
            if _kind(gm, n) == "OnnxMatMul" and all(
                isinstance(a, fx.Node) and a.op != "get_attr" for a in n.args
            ):
                return True
            nxt.extend(a for a in n.args if isinstance(a, fx.Node) and a.op != "get_attr")
        frontier = nxt
    return False


def _owner(gm: fx.GraphModule, target: str) -> tuple[nn.Module, str]:
    *path, leaf = target.split(".")
    mod: nn.Module = gm
    for part in path:
        mod = getattr(mod, part)
    return mod, leaf


def embeddings_as_parameters(gm: fx.GraphModule) -> list[str]:
    """Float constants joined to the stream (Add / Concat with an activation), with a
    channel axis last, become trainable parameters; returns their names."""
    done: list[str] = []
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        users = list(node.users)
        via = node
        while (
            len(users) == 1 and _kind(gm, users[0]) == "OnnxExpand"
        ):  # a class token broadcast to the batch
            via = users[0]
            users = list(via.users)
        if len(users) != 1 or _kind(gm, users[0]) not in _JOIN:
            continue
        user = users[0]
        others = [
            a for a in user.args if isinstance(a, fx.Node) and a is not via and a.op != "get_attr"
        ]
        if not others or any(_near_attention_logits(gm, o) for o in others):
            continue
        owner, leaf = _owner(gm, str(node.target))
        value = getattr(owner, leaf)
        if not isinstance(value, torch.Tensor) or isinstance(value, nn.Parameter):
            continue
        if (
            not value.is_floating_point()
            or value.dim() < 2
            or value.numel() < 2
            or value.shape[-1] < 2
        ):
            continue
        if leaf in owner._buffers:
            del owner._buffers[leaf]
        owner.register_parameter(leaf, nn.Parameter(value.detach().clone()))
        done.append(str(node.target))
    return done


def lift_embeddings(gm: fx.GraphModule) -> list[str]:
    """`Gather(table[V, E] constant, token ids, axis=0)` becomes an `nn.Embedding`, whose
    width Torch-Pruning prunes with the stream it feeds."""
    lifted: list[str] = []
    for node in list(gm.graph.nodes):
        if _kind(gm, node) != "OnnxGather" or len(node.args) != 2:
            continue
        table, ids = node.args
        if (
            not isinstance(table, fx.Node)
            or table.op != "get_attr"
            or not isinstance(ids, fx.Node)
            or ids.op == "get_attr"
        ):
            continue
        if gm.get_submodule(str(node.target))._axis != 0:
            continue
        owner, leaf = _owner(gm, str(table.target))
        weight = getattr(owner, leaf)
        if (
            not isinstance(weight, torch.Tensor)
            or weight.dim() != 2
            or not weight.is_floating_point()
        ):
            continue
        emb = nn.Embedding(int(weight.shape[0]), int(weight.shape[1]))
        with torch.no_grad():
            emb.weight.copy_(weight)
        name = str(node.target).replace(".", "_") + "_embedding"
        gm.add_submodule(name, emb)
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(name, (ids,))
        node.replace_all_uses_with(new)
        lifted.append(name)
    if lifted:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
        gm.delete_all_unused_submodules()
        from engine.fx_util import drop_unused_constants

        drop_unused_constants(gm)  # the table now lives in the Embedding: count it once
    return lifted


class _KeptStatsLayerNorm(nn.Module):
    """A LayerNorm over the last dim whose mean and variance see only the kept channels
    (removed ones, already zeroed, output 0): what the pruned LayerNorm computes."""

    def __init__(self, norm: nn.LayerNorm, keep: torch.Tensor) -> None:
        super().__init__()
        self.norm, self.keep = norm, keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept = x.index_select(-1, self.keep.to(x.device))
        mean = kept.mean(-1, keepdim=True)
        var = kept.var(-1, unbiased=False, keepdim=True)
        y = (x - mean) / torch.sqrt(var + self.norm.eps)
        if self.norm.weight is not None:
            y = y * self.norm.weight
        if self.norm.bias is not None:
            y = y + self.norm.bias
        return y


def probe_layernorm_coupled(
    model: nn.Module, example: torch.Tensor, batch: torch.Tensor, root: str, idxs
) -> str | None:
    """Zero-equivalence for a width shared with LayerNorms (the residual stream).

    Removing channels from a LayerNorm'd stream changes the normalisation statistics — that
    is what pruning the width means, not a wiring error — so the zeroed reference computes
    each coupled LayerNorm's statistics over the kept channels only; everything else must
    match the structurally pruned model exactly, as in graph.probe_group."""
    import copy

    from engine import graph

    m = copy.deepcopy(model)
    try:
        dg = graph.build_dependency_graph(m, example)
        group = graph.full_group(m, dg, root, idxs)
    except Exception as exc:
        return f"the dependency graph cannot form this group ({type(exc).__name__}: {exc})"
    norms = {}
    for item in group:
        target = item.dep.target.module
        if isinstance(target, nn.LayerNorm) and dg.is_out_channel_pruning_fn(item.dep.handler):
            if len(target.normalized_shape) != 1:
                return "a LayerNorm normalises over more than the pruned dim"
            removed = set(int(i) for i in item.idxs)
            norms[target] = torch.tensor(
                [c for c in range(target.normalized_shape[0]) if c not in removed]
            )
    if not norms:
        return "no LayerNorm in the group"
    zeroed_model = copy.deepcopy(m)
    zdg = graph.build_dependency_graph(zeroed_model, example)
    zgroup = graph.full_group(zeroed_model, zdg, root, idxs)
    graph.zero_out_channels(zdg, zgroup)
    names = {mod: n for n, mod in m.named_modules()}
    for norm, keep in norms.items():
        name = names[norm]
        parent_name, _, leaf = name.rpartition(".")
        parent = zeroed_model.get_submodule(parent_name) if parent_name else zeroed_model
        setattr(parent, leaf, _KeptStatsLayerNorm(getattr(parent, leaf), keep))
    try:
        with torch.no_grad():
            zeroed = graph.run_located(zeroed_model, batch)
        group.prune()
        with torch.no_grad():
            pruned = graph.run_located(m, batch)
    except Exception as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"the pruned graph no longer runs: {text}"
    if pruned.shape != zeroed.shape:
        return f"removing its channels changes the model output shape {tuple(zeroed.shape)} -> {tuple(pruned.shape)}"
    ok, rel = graph.outputs_close(zeroed, pruned)
    if not ok:
        return (
            f"removing its channels changes the function beyond the removed channels and the LayerNorm "
            f"statistics (relative difference {rel:.2e})"
        )
    return None
