"""Finding attention blocks in the converted graph: the q/k/v projections, the head
reshapes and the output projection of each, as `HeadBlock`s."""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from engine.reshapes import _Recorder

SUFFIX = "#heads"
_LAYOUT = {
    "StaticReshape",
    "OnnxTranspose",
    "AxisSwap",  # axis_swap.py
    "OnnxGather",
    "OnnxSqueezeStaticAxes",
    "OnnxSqueezeDynamicAxes",
    "OnnxUnsqueezeStaticAxes",
    "OnnxUnsqueezeDynamicAxes",
    "SampleFlatten",
    "Flatten",
    "OnnxFlatten",
    "OnnxSplit13",
    "OnnxSplit",
    "_SplitEqual",  # timm's qkv.unbind(0): pieces of size 1, no channel sizes
}
_SCALE = {"OnnxBinaryMathOperation", "Identity", "Dropout"}


@dataclass
class HeadBlock:
    """One attention block: where its heads live in the (converted) module."""

    name: str  # the group name: "<out projection>#heads"
    heads: int
    q: str
    k: str
    v: str
    out: str
    channel_heads: dict[str, list[int]] = field(
        default_factory=dict
    )  # linear -> head of each out channel (-1: not attention)
    out_heads: list[int] = field(default_factory=list)  # head of each input column of `out`
    reshapes: dict[str, int] = field(
        default_factory=dict
    )  # StaticReshape module -> dim holding the heads
    selects: list[str] = field(
        default_factory=list
    )  # HeadSelect modules on per-head biases of the logits


def is_head_group(name: str) -> bool:
    return name.endswith(SUFFIX)


def _kind(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_function" and node.target is operator.getitem:
        return "getitem"
    return type(gm.get_submodule(str(node.target))).__name__ if node.op == "call_module" else ""


def _is_const(node: object) -> bool:
    return not isinstance(node, fx.Node) or node.op == "get_attr"


def _walk_back(gm: fx.GraphModule, node: fx.Node, values) -> tuple[str, list[fx.Node]] | None:
    """From an attention operand back to the Linear producing it, through layout ops."""
    path: list[fx.Node] = []
    cur = node
    for _ in range(16):
        kind = _kind(gm, cur)
        if kind == "Linear":
            return str(cur.target), path[::-1]
        if kind not in _LAYOUT and kind not in _SCALE and kind != "getitem":
            return None
        if kind == "OnnxBinaryMathOperation":
            acts = [a for a in cur.args if not _is_const(a)]
            consts = [a for a in cur.args if _is_const(a)]
            if len(acts) != 1 or len(consts) != 1:
                return None
            c = values.get(consts[0]) if isinstance(consts[0], fx.Node) else consts[0]
            if isinstance(c, torch.Tensor) and c.numel() != 1:
                return None
        path.append(cur)
        act_nodes = [a for a in cur.args if isinstance(a, fx.Node) and not _is_const(a)]
        if not act_nodes:
            return None
        cur = act_nodes[0]
    return None


def _walk_forward(gm: fx.GraphModule, node: fx.Node) -> tuple[str, list[fx.Node]] | None:
    path: list[fx.Node] = []
    cur = node
    for _ in range(16):
        users = list(cur.users)
        if len(users) != 1:
            return None
        cur = users[0]
        kind = _kind(gm, cur)
        if kind == "Linear":
            return str(cur.target), path
        if kind not in _LAYOUT:
            return None
        path.append(cur)
    return None


def _push(
    gm: fx.GraphModule, start: fx.Node, start_value: torch.Tensor, path: Sequence[fx.Node], values
) -> dict[fx.Node, torch.Tensor]:
    """Run `path` on an index tensor standing in for `start`'s output (other args as traced)."""
    env: dict[fx.Node, torch.Tensor] = {start: start_value}
    for n in path:
        args = []
        for a in n.args:
            if isinstance(a, fx.Node):
                args.append(env[a] if a in env else values[a])
            else:
                args.append(a)
        kind = _kind(gm, n)
        if kind in _SCALE:
            src = next(a for a in n.args if isinstance(a, fx.Node) and a in env)
            env[n] = env[src]
        elif kind == "getitem":
            env[n] = args[0][args[1]]
        else:
            env[n] = gm.get_submodule(str(n.target))(*args)
    return env


def _heads_of(t: torch.Tensor) -> tuple[dict[int, int], int]:
    """channel value -> head, and the leading dim holding the heads, of an index tensor
    [..., x, y] (the other leading dims — batch, windows — repeat the same channels)."""
    lead = list(range(t.dim() - 2))
    varying = [j for j in lead if t.shape[j] > 1 and _varies(t, j)]
    if len(varying) != 1:
        raise ValueError("heads are not one leading dim")
    dim = varying[0]
    sample = t
    for j in reversed(lead):
        if j != dim:
            sample = sample.select(j, 0)
    found: dict[int, int] = {}
    for h in range(sample.shape[0]):
        for c in sample[h].reshape(-1).tolist():
            if found.setdefault(int(c), h) != h:
                raise ValueError("a channel feeds two heads")
    return found, dim


def _varies(heads: torch.Tensor, dim: int) -> bool:
    """Whether the head (ignoring -1: channels outside this projection) changes along `dim`."""
    rows = heads.movedim(dim, -1).reshape(-1, heads.shape[dim])
    valid = rows >= 0
    hi = torch.where(valid, rows, torch.full_like(rows, -1.0)).max(dim=1).values
    lo = torch.where(valid, rows, torch.full_like(rows, float("inf"))).min(dim=1).values
    return bool(((hi > lo) & valid.any(dim=1)).any())


def _reshape_head_dims(
    gm,
    env: dict[fx.Node, torch.Tensor],
    head_of: Callable[[torch.Tensor], torch.Tensor],
    out: dict[str, int],
) -> None:
    for n, t in env.items():
        if _kind(gm, n) != "StaticReshape":
            continue
        shape = gm.get_submodule(str(n.target)).shape
        heads = head_of(t).double()
        dims = [
            j for j in range(t.dim()) if shape[j] != -1 and t.shape[j] > 1 and _varies(heads, j)
        ]
        if len(dims) > 1:
            raise ValueError(f"heads spread over several dims of reshape {n.target}")
        if dims:
            if out.setdefault(str(n.target), dims[0]) != dims[0]:
                raise ValueError("inconsistent head dim")


class HeadSelect(nn.Module):
    """Keeps the surviving heads of a per-head term added to the attention logits (Swin's
    relative-position bias): identity until heads are removed."""

    keep: torch.Tensor

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("keep", torch.arange(heads), persistent=True)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[self.dim] == self.keep.numel():
            return x
        return torch.index_select(x, self.dim, self.keep.to(x.device))


def _logit_path(
    gm: fx.GraphModule, a1: fx.Node, values, head_dim: int, heads: int, reshapes: dict[str, int]
) -> list[str]:
    """Between q·kᵀ and the Softmax: Reshapes whose head dim must shrink, and per-head
    operands (biases, masks) that get a HeadSelect in front."""
    out = values[a1]
    assert isinstance(out, torch.Tensor)
    view = [1] * out.dim()
    view[head_dim] = heads
    index = torch.arange(heads, dtype=torch.float64).view(view).expand(out.shape).clone()
    env: dict[fx.Node, torch.Tensor] = {a1: index}
    selects: list[str] = []
    cur = a1
    while True:
        nxt = next(iter(cur.users))
        kind = _kind(gm, nxt)
        if kind == "Softmax":
            break
        if kind == "StaticReshape":
            env[nxt] = gm.get_submodule(str(nxt.target))(env[cur])
            _reshape_head_dims(gm, {nxt: env[nxt]}, lambda t: t, reshapes)
        elif kind in ("OnnxBinaryMathOperation", "Dropout", "Identity"):
            env[nxt] = env[cur]
            for pos, other in enumerate(nxt.args):
                if other is cur or not isinstance(other, fx.Node):
                    continue
                val = values.get(other)
                t = env[cur]
                if not isinstance(val, torch.Tensor) or val.dim() == 0:
                    continue
                dims = [j for j in range(t.dim()) if t.shape[j] > 1 and _varies(t, j)]
                if len(dims) != 1:
                    raise ValueError("no single head dim on the logits")
                j = dims[0] - (t.dim() - val.dim())
                if j < 0 or val.shape[j] == 1:
                    continue
                if val.shape[j] != heads:
                    raise ValueError("a logits operand does not line up with the heads")
                name = f"{str(nxt.target).replace('.', '_')}_heads{pos}"
                gm.add_submodule(name, HeadSelect(j, heads))
                with gm.graph.inserting_before(nxt):
                    sel = gm.graph.call_module(name, (other,))
                nxt.replace_input_with(other, sel)
                values[sel] = val
                selects.append(name)
        else:
            raise ValueError(f"unexpected op {kind} on the attention logits")
        cur = nxt
    if selects:
        gm.recompile()
    return selects


def find_blocks(gm: fx.GraphModule, example: torch.Tensor) -> list[HeadBlock]:
    """Attention blocks of a converted model whose heads can be mapped to channels."""
    if not isinstance(gm, fx.GraphModule):
        return []
    rec = _Recorder(gm)
    with torch.no_grad():
        rec.run(example[:1])
    values = rec.values
    blocks: list[HeadBlock] = []
    for a1 in gm.graph.nodes:
        if _kind(gm, a1) != "OnnxMatMul" or len(a1.args) != 2 or any(_is_const(a) for a in a1.args):
            continue
        cur, a2 = a1, None
        for _ in range(6):
            users = list(cur.users)
            if len(users) != 1:
                break
            cur = users[0]
            if _kind(gm, cur) == "Softmax":
                nxt = list(cur.users)
                if len(nxt) == 1 and _kind(gm, nxt[0]) == "OnnxMatMul" and nxt[0].args[0] is cur:
                    a2 = nxt[0]
                break
            if _kind(gm, cur) not in ("OnnxBinaryMathOperation", "Dropout", "Identity"):
                break
        if a2 is None:
            continue
        try:
            block = _describe(gm, a1, a2, values)
        except (ValueError, KeyError, RuntimeError, StopIteration, IndexError, TypeError):
            block = None
        if block is not None:
            blocks.append(block)
    return blocks


def _describe(gm: fx.GraphModule, a1: fx.Node, a2: fx.Node, values) -> HeadBlock | None:
    q_in, k_in, v_in = a1.args[0], a1.args[1], a2.args[1]
    assert isinstance(q_in, fx.Node) and isinstance(k_in, fx.Node) and isinstance(v_in, fx.Node)
    q, k, v = (
        _walk_back(gm, q_in, values),
        _walk_back(gm, k_in, values),
        _walk_back(gm, v_in, values),
    )
    fwd = _walk_forward(gm, a2)
    if q is None or k is None or v is None or fwd is None:
        return None
    channel_heads: dict[str, list[int]] = {}
    reshapes: dict[str, int] = {}
    heads_count = None
    for (linear, path), operand in ((q, q_in), (k, k_in), (v, v_in)):
        lin_node = next(
            n for n in gm.graph.nodes if n.op == "call_module" and str(n.target) == linear
        )
        if (
            any(u not in path and u is not operand for u in lin_node.users)
            and operand is not lin_node
        ):
            return None  # the projection feeds something besides attention
        ref = values[lin_node]
        assert isinstance(ref, torch.Tensor)
        width = ref.shape[-1]
        index = torch.arange(width, dtype=torch.float64).expand(ref.shape).clone()
        env = _push(gm, lin_node, index, path, values)
        at = env[operand] if operand in env else index
        heads, head_dim = _heads_of(at)
        n_heads = len(set(heads.values()))
        if heads_count is None:
            heads_count = n_heads
        if n_heads != heads_count or n_heads < 2:
            return None
        row = channel_heads.setdefault(linear, [-1] * width)
        for c, h in heads.items():
            if row[c] != -1 and row[c] != h:
                return None
            row[c] = h
        lut = torch.tensor(row, dtype=torch.float64)

        def head_of(t: torch.Tensor, lut: torch.Tensor = lut) -> torch.Tensor:
            return lut[t.long()]

        _reshape_head_dims(gm, env, head_of, reshapes)
    out_name, out_path = fwd
    attn_out = values[a2]
    assert isinstance(attn_out, torch.Tensor) and heads_count is not None
    d = attn_out.shape[-1]
    if attn_out.shape[head_dim] != heads_count:
        return None
    view = [1] * attn_out.dim()
    view[head_dim] = heads_count
    index = torch.arange(heads_count, dtype=torch.float64).view(view) * d + torch.arange(
        d, dtype=torch.float64
    )
    index = index.expand(attn_out.shape).clone()
    selects = _logit_path(gm, a1, values, head_dim, heads_count, reshapes)
    env = _push(gm, a2, index, out_path, values)
    final = env[out_path[-1]] if out_path else index
    out_mod = gm.get_submodule(out_name)
    if final.shape[-1] != out_mod.in_features:
        return None
    cols = final.reshape(-1, final.shape[-1])
    if not bool((cols == cols[0]).all()):
        return None
    out_heads = (cols[0] // d).long().tolist()
    _reshape_head_dims(gm, env, lambda t: (t // d).long(), reshapes)
    for name, row in channel_heads.items():
        if name != out_name and any(h < 0 for h in row) and any(h >= 0 for h in row):
            pass  # a packed projection may carry non-attention channels: they stay
    return HeadBlock(
        name=out_name + SUFFIX,
        heads=heads_count,
        q=q[0],
        k=k[0],
        v=v[0],
        out=out_name,
        channel_heads=channel_heads,
        out_heads=out_heads,
        reshapes=reshapes,
        selects=selects,
    )
