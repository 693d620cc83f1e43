"""Batch-polymorphic Reshapes: constant shapes that carry the batch size become shapes
that follow it.

Exporters write the batch into Reshape shapes in three ways, and each breaks a different
thing downstream:

* a fixed-batch export (the dynamo exporter's default) writes `[1, 32]`, `[1, 2, 4, 2, 4, 16]`
  (Swin's window partition) or `[16, 1, 3, 32]` (nn.MultiheadAttention's sequence-first
  packing) as constants, so the module cannot run at any other batch — not in training,
  not in the probe;
* a dynamic-batch legacy export computes shapes from `Shape` ops, which hides the head
  counts and widths that pruning must rewrite;
* `x.flatten(1)` becomes `Reshape(x, [-1, C*H*W])` with the channel count baked in.

`make_batch_polymorphic` traces the module once at the example's batch, follows which
dimension of every tensor carries the batch (and by which per-sample factor: Swin's
windows and MHA's heads are folded into it), and replaces every Reshape by a static one
whose batch-carrying dimension is `-1` (or by a Flatten when it only flattens per sample).
The rewrite is then proven: the module at twice the batch must reproduce, sample for
sample, the original module at the traced batch; otherwise it is undone and the caller
keeps the uploaded behaviour.
"""

from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass
from typing import cast

import torch
import torch.fx as fx
from torch import nn

Info = (
    tuple[int, int, int] | None
)  # (batch-carrying dim d, outer, inner): size(d) = outer * batch * inner


class StaticReshape(nn.Module):
    """Reshape to a constant shape whose batch-carrying dimension (if any) is -1.

    `shape` is a buffer-free python list so that head pruning can rewrite it in place."""

    def __init__(self, shape: list[int], follow: dict[int, int] | None = None) -> None:
        super().__init__()
        self.shape = [int(s) for s in shape]
        # Output dims copied from input dims at run time (leading or trailing dims that the
        # reshape leaves alone): a channel count pruned there flows through.
        self.follow = dict(follow or {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.follow:
            return torch.reshape(x, self.shape)
        shape: list = list(self.shape)
        for out_dim, in_dim in self.follow.items():
            shape[out_dim] = x.shape[in_dim]
        return torch.reshape(x, shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, follow={self.follow}"


def _follow(in_shape: list[int], out_shape: list[int], batch_dim: int | None) -> dict[int, int]:
    """Leading and trailing output dims that are the input's own dims (row-major)."""
    follow: dict[int, int] = {}
    i = 0
    while i < min(len(in_shape), len(out_shape)) and in_shape[i] == out_shape[i]:
        follow[i] = i
        i += 1
    j = 1
    while j <= min(len(in_shape), len(out_shape)) - i and in_shape[-j] == out_shape[-j]:
        follow[len(out_shape) - j] = len(in_shape) - j
        j += 1
    follow.pop(batch_dim if batch_dim is not None else -100, None)
    if len(follow) == len(
        out_shape
    ):  # an identity reshape: keep one dim free for the element count
        follow.pop(max(follow))
    return {o: i for o, i in follow.items() if out_shape[o] > 1}


class SampleFlatten(nn.Module):
    """`Reshape(x, [batch, -1])`: flattens each sample (keeps the channel count free)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(x, 1)


class BatchConcat(nn.Module):
    """Concat whose batch-free inputs (a class token baked at batch 1) are broadcast along
    the batch dimension first. The test is on the free input's own (static) size, not on
    the batch: traced at batch 1 (the ONNX export's example) the broadcast must still be
    recorded, or the exported graph fixes its batch at 1."""

    def __init__(self, axis: int, batch_dim: int, free: list[bool]) -> None:
        super().__init__()
        self.axis, self.batch_dim, self.free = axis, batch_dim, list(free)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        ref = next(x for x, f in zip(xs, self.free, strict=True) if not f)
        n = ref.shape[self.batch_dim]
        parts = []
        for x, f in zip(xs, self.free, strict=True):
            if f and x.shape[self.batch_dim] == 1:
                size = list(x.shape)
                size[self.batch_dim] = n
                x = x.expand(size)
            parts.append(x)
        return torch.cat(parts, dim=self.axis)


def _kind(gm: fx.GraphModule, node: fx.Node) -> str:
    return type(gm.get_submodule(str(node.target))).__name__ if node.op == "call_module" else ""


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[fx.Node, object] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        self.values[n] = out
        return out


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.args if isinstance(a, fx.Node)]


def _find_dim(
    in_shape: list[int], src: tuple[int, int, int], out_shape: list[int], b0: int, reshape: bool
) -> Info:
    """The output dim that carries the batch: the one holding the same element prefix
    (everything outside the batch in row-major order) followed by the batch."""
    k, outer, inner = src
    prefix = math.prod(in_shape[:k]) * outer
    found: list[tuple[int, int, int]] = []
    for j, size in enumerate(out_shape):
        before = math.prod(out_shape[:j])
        if size <= 0 or before == 0 or prefix % before:
            continue
        o = prefix // before
        if size % (o * b0) == 0:
            found.append((j, o, size // (o * b0)))
    same = [f for f in found if out_shape[f[0]] == in_shape[k] and f[1] == outer]
    if same:
        return same[0]
    return found[0] if (found and reshape) else None


@dataclass
class Rewrite:
    reshapes: int
    flattens: int
    concats: int
    unresolved: list[str]
    expands: int = 0


def _infer(
    gm: fx.GraphModule, values: dict[fx.Node, object], b0: int
) -> tuple[dict[fx.Node, Info], list[str]]:
    info: dict[fx.Node, Info] = {}
    unresolved: list[str] = []
    for node in gm.graph.nodes:
        out = values.get(node)
        if node.op == "placeholder":
            info[node] = (0, 1, 1)
            continue
        if node.op == "call_function" and node.target is operator.getitem:
            info[node] = info.get(node.args[0]) if isinstance(node.args[0], fx.Node) else None
            continue
        srcs = [
            a
            for a in _tensor_args(node)
            if info.get(a) is not None and isinstance(values.get(a), torch.Tensor)
        ]
        if not srcs or node.op in ("get_attr", "output"):
            info[node] = None
            continue
        src = srcs[0]
        k, outer, inner = info[src]  # type: ignore[misc]
        x = values[src]
        assert isinstance(x, torch.Tensor)
        kind = _kind(gm, node)
        first = out[0] if isinstance(out, (tuple, list)) and out else out
        if not isinstance(first, torch.Tensor) or first.dim() == 0:
            info[node] = None
            continue
        out_shape = list(first.shape)
        if kind == "OnnxTranspose":
            perm_attr = cast("list[int] | None", gm.get_submodule(str(node.target)).perm)
            perm = perm_attr or list(range(x.dim()))[::-1]
            info[node] = (list(perm).index(k), outer, inner)
            continue
        if kind in ("OnnxReshape", "OnnxReshapeAllowZero"):
            found = _find_dim(list(x.shape), info[src], out_shape, b0, reshape=True)  # type: ignore[arg-type]
            if found is None:
                unresolved.append(str(node.target))
            info[node] = found
            continue
        if kind == "OnnxGather":
            axis = cast(int, gm.get_submodule(str(node.target))._axis)
            data, idx = (node.args + (None, None))[:2]
            idx_val = values.get(idx) if isinstance(idx, fx.Node) else None
            idx_dim = idx_val.dim() if isinstance(idx_val, torch.Tensor) else 0
            if src is data:
                axis = axis % x.dim()
                if axis != k:
                    info[node] = ((k - 1 + idx_dim) if axis < k else k, outer, inner)
                elif isinstance(idx, fx.Node) and idx.op != "get_attr":
                    # Indices computed from the input's shape (the dynamo exporter's strided
                    # pooling): the batch survives in the gathered layout.
                    info[node] = _find_dim(list(x.shape), info[src], out_shape, b0, reshape=True)  # type: ignore[arg-type]
                else:
                    info[node] = None
            else:  # an embedding lookup: the indices carry the batch
                data_val = cast(torch.Tensor, values[data])
                info[node] = (axis % max(data_val.dim(), 1) + k, outer, inner)
            continue
        if node.op == "call_module" and first.dim() == x.dim() and out_shape[k] == x.shape[k]:
            info[node] = (k, outer, inner)
            continue
        if first.numel() == x.numel():  # squeeze / unsqueeze / flatten-like: same element order
            found = _find_dim(list(x.shape), info[src], out_shape, b0, reshape=False)  # type: ignore[arg-type]
            if found is not None:
                info[node] = found
                continue
        # Right-aligned broadcasting (a rank-3 activation times a rank-4 one, ...).
        shift = first.dim() - x.dim()
        if 0 <= k + shift < first.dim() and out_shape[k + shift] == x.shape[k] and shift > 0:
            info[node] = (k + shift, outer, inner)
            continue
        info[node] = _find_dim(list(x.shape), info[src], out_shape, b0, reshape=False)  # type: ignore[arg-type]
    return info, unresolved


def rewrite(gm: fx.GraphModule, example: torch.Tensor) -> Rewrite:
    """Rewrite `gm` in place (see the module docstring); `example` fixes the traced batch."""
    rec = _Recorder(gm)
    with torch.no_grad():
        rec.run(example)
    values = rec.values
    b0 = int(example.shape[0])
    info, unresolved = _infer(gm, values, b0)
    result = Rewrite(0, 0, 0, unresolved)
    for node in list(gm.graph.nodes):
        kind = _kind(gm, node)
        if kind in ("OnnxReshape", "OnnxReshapeAllowZero") and str(node.target) not in unresolved:
            src = node.args[0]
            out = values.get(node)
            if not isinstance(src, fx.Node) or not isinstance(out, torch.Tensor):
                continue
            x = values[src]
            if not isinstance(x, torch.Tensor):
                continue
            shape = list(out.shape)
            src_info, out_info = info.get(src), info.get(node)
            if src_info is not None and out_info is None:
                continue
            if (
                src_info == (0, 1, 1)
                and out_info == (0, 1, 1)
                and len(shape) == 2
                and x.dim() > 2
                and shape[1] == math.prod(x.shape[1:])
            ):
                module: nn.Module = SampleFlatten()
                result.flattens += 1
            else:
                if out_info is not None:
                    shape[out_info[0]] = -1
                module = StaticReshape(
                    shape,
                    _follow(list(x.shape), list(out.shape), out_info[0] if out_info else None),
                )
                result.reshapes += 1
            name = _fresh(gm, str(node.target).replace(".", "_") + "_static")
            gm.add_submodule(name, module)
            with gm.graph.inserting_after(node):
                new = gm.graph.call_module(name, (src,))
            node.replace_all_uses_with(new)
            values[new], info[new] = values[node], info.get(node)
        elif kind == "OnnxConcat":
            ins = list(node.args)
            infos = [info.get(a) if isinstance(a, fx.Node) else None for a in ins]
            carried = [i for i in infos if i is not None]
            out_info = info.get(node)
            if not carried or out_info is None or all(i is not None for i in infos):
                continue
            axis = cast(int, gm.get_submodule(str(node.target)).axis)
            out = values[node]
            assert isinstance(out, torch.Tensor)
            axis = axis % out.dim()
            if out_info[1:] != (1, 1) or out_info[0] == axis:
                continue
            name = _fresh(gm, str(node.target).replace(".", "_") + "_batch")
            gm.add_submodule(name, BatchConcat(axis, out_info[0], [i is None for i in infos]))
            with gm.graph.inserting_after(node):
                new = gm.graph.call_module(name, tuple(ins))
            node.replace_all_uses_with(new)
            values[new], info[new] = values[node], info.get(node)
            result.concats += 1
    gm.graph.eliminate_dead_code()
    result.expands = _drop_batch_expands(gm, values, b0)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return result


def _drop_batch_expands(gm: fx.GraphModule, values: dict[fx.Node, object], b0: int) -> int:
    """`cls_token.expand(B, -1, -1)` feeding a BatchConcat: the Expand's shape is computed
    from the batch through Shape ops, and onnx2torch's module builds a `torch.Size` from
    that tensor, which torch.export cannot trace (a torchvision ViT got no model.pt2).
    BatchConcat already broadcasts a batch-free input, so such an Expand (it only broadcasts
    the batch dimension) is dropped and its shape computation dies with it."""
    dropped = 0
    for node in list(gm.graph.nodes):
        if _kind(gm, node) != "OnnxExpand" or len(node.args) != 2:
            continue
        src, shape = node.args
        if not isinstance(src, fx.Node) or not isinstance(shape, fx.Node) or shape.op == "get_attr":
            continue
        x, out = values.get(src), values.get(node)
        if not isinstance(x, torch.Tensor) or not isinstance(out, torch.Tensor):
            continue
        if x.dim() != out.dim():
            continue
        diff = [d for d in range(x.dim()) if x.shape[d] != out.shape[d]]
        if len(diff) != 1 or x.shape[diff[0]] != 1 or out.shape[diff[0]] != b0:
            continue
        ok = bool(node.users)
        for user in node.users:
            mod = gm.get_submodule(str(user.target)) if user.op == "call_module" else None
            ok = ok and (
                isinstance(mod, BatchConcat)
                and mod.batch_dim == diff[0]
                and not user.kwargs
                and all(mod.free[i] for i, a in enumerate(user.args) if a is node)
            )
        if ok:
            node.replace_all_uses_with(src)
            dropped += 1
    return dropped


def _fresh(gm: fx.GraphModule, name: str) -> str:
    taken = dict(gm.named_modules())
    candidate, i = name, 1
    while candidate in taken:
        candidate, i = f"{name}_{i}", i + 1
    return candidate


def _run(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = module(x)
    return out[0] if isinstance(out, (tuple, list)) else out


def make_batch_polymorphic(
    gm: fx.GraphModule, example: torch.Tensor, reference, second: torch.Tensor
) -> tuple[fx.GraphModule, str | None]:
    """A rewritten copy of `gm`, or `gm` itself and the reason the rewrite was refused.

    `reference(x)` returns the uploaded model's output at the traced batch (onnxruntime);
    `second` is another input at that batch. The rewritten module runs on both stacked
    into one batch of twice the size and must reproduce the reference on each half."""
    candidate = copy.deepcopy(gm)
    try:
        done = rewrite(candidate, example)
    except Exception as exc:  # an op the tracer cannot run alone: keep the uploaded graph
        return (
            gm,
            f"the batch-polymorphic rewrite could not trace the graph ({type(exc).__name__}: {exc})",
        )
    if done.reshapes == 0 and done.flattens == 0 and done.concats == 0 and done.expands == 0:
        return gm, None
    b = example.shape[0]
    first = example
    try:
        both = _run(candidate, torch.cat([first, second]))
        expected = [torch.as_tensor(reference(first)), torch.as_tensor(reference(second))]
        got = [both[:b], both[b:]]
    except Exception as exc:
        return (
            gm,
            f"after the batch-polymorphic rewrite the model fails at batch {2 * b} ({_line(exc)})",
        )
    for e, g in zip(expected, got, strict=True):
        e = e.to(g.dtype)
        scale = max(float(e.abs().max()), 1e-6)
        if e.shape != g.shape or float((e - g).abs().max()) > 1e-4 * scale + 1e-5:
            return gm, (
                f"after the batch-polymorphic rewrite a batch of {2 * b} does not reproduce the model "
                f"sample for sample; kept the uploaded Reshapes (unresolved: {', '.join(done.unresolved[:3]) or 'none'})"
            )
    return candidate, None


def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
