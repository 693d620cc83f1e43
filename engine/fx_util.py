"""Small FX helpers shared by the graph rewrites (fx_rewrites, channel_consts, shuffle,
residual): the ONNX op kind of a node, dropping unused initialisers, and the
shape-propagate → rewrite → clean-up frame every rewrite runs in."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx


def module_kind(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op != "call_module":
        return ""
    mod = gm.get_submodule(str(node.target))
    kind = type(mod).__name__
    if kind == "OnnxBinaryMathOperation":
        fn = getattr(mod, "math_op_function", None)
        names: dict[Any, str] = {torch.add: "Add", torch.sub: "Sub", torch.mul: "Mul"}
        return names.get(fn, "Div")
    return kind


def constant_of(gm: fx.GraphModule, node: object) -> torch.Tensor | None:
    """The tensor a `get_attr` node reads (a constant of the graph), else None."""
    if isinstance(node, fx.Node) and node.op == "get_attr":
        obj: object = gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, torch.Tensor):
            return obj
    return None


def drop_unused_constants(gm: fx.GraphModule) -> None:
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    holder = getattr(gm, "initializers", None)
    if holder is None:
        return
    for name in list(holder._buffers):
        if f"initializers.{name}" not in used:
            del holder._buffers[name]
    for name in list(holder._parameters):
        if f"initializers.{name}" not in used:
            del holder._parameters[name]


def rewrite_with_shapes(
    gm: fx.GraphModule, example: torch.Tensor, rewrite: Callable[[fx.GraphModule], list[str]]
) -> list[str]:
    """Propagate `example`'s shapes through `gm` (nothing is rewritten when that fails), run
    `rewrite` (it returns the names of the modules it inserted), and when anything changed
    drop dead nodes, unused submodules and unused constants."""
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        ShapeProp(gm).propagate(example)
    except Exception:
        return []
    done = rewrite(gm)
    if done:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
        gm.delete_all_unused_submodules()
        drop_unused_constants(gm)
    return done


def replace_with_module(
    gm: fx.GraphModule, node: fx.Node, name: str, module: torch.nn.Module, args: tuple
) -> str:
    """Add `module` as submodule `name` (unless it is there), call it on `args` right after
    `node`, and hand `node`'s users (and shape metadata) to the new call; returns `name`."""
    if not hasattr(gm, name):
        gm.add_submodule(name, module)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(name, args)
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    return name
