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
        return {torch.add: "Add", torch.sub: "Sub", torch.mul: "Mul"}.get(getattr(mod, "math_op_function", None), "Div")
    return kind


def _near_attention_logits(gm: fx.GraphModule, node: fx.Node, hops: int = 4) -> bool:
    """Whether `node` is (a few layout ops after) an activation x activation MatMul: masks and
    relative-position biases are added there, and they are not embeddings."""
    frontier = [node]
    for _ in range(hops):
        nxt = []
        for n in frontier:
            if not isinstance(n, fx.Node):
                continue
            if _kind(gm, n) == "OnnxMatMul" and all(isinstance(a, fx.Node) and a.op != "get_attr" for a in n.args):
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
        while len(users) == 1 and _kind(gm, users[0]) == "OnnxExpand":  # a class token broadcast to the batch
            via = users[0]
            users = list(via.users)
        if len(users) != 1 or _kind(gm, users[0]) not in _JOIN:
            continue
        user = users[0]
        others = [a for a in user.args if isinstance(a, fx.Node) and a is not via and a.op != "get_attr"]
        if not others or any(_near_attention_logits(gm, o) for o in others):
            continue
        owner, leaf = _owner(gm, str(node.target))
        value = getattr(owner, leaf)
        if not isinstance(value, torch.Tensor) or isinstance(value, nn.Parameter):
            continue
        if not value.is_floating_point() or value.dim() < 2 or value.numel() < 2 or value.shape[-1] < 2:
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
        if not isinstance(table, fx.Node) or table.op != "get_attr" or not isinstance(ids, fx.Node) or ids.op == "get_attr":
            continue
        if gm.get_submodule(str(node.target))._axis != 0:
            continue
        owner, leaf = _owner(gm, str(table.target))
        weight = getattr(owner, leaf)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
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
    return lifted
