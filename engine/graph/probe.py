"""Zero-equivalence probes: zero the channels a plan would remove, run, remove them
structurally, run again; removing channels whose contribution is already zero must not
change the output. Forward passes here name the failing op of the converted graph."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
import torch.fx as fx
import torch_pruning as tp
from torch import nn

from engine.bounded import AnalyseBudget, UnboundedGroup
from engine.graph.surgery import build_dependency_graph, full_group, zero_out_channels


class _LocatingInterpreter(fx.Interpreter):
    """Runs a GraphModule node by node: errors name the failing op, and ops that change the
    batch dimension (a channel count baked into a constant Reshape) are recorded."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.batch_changes: list[str] = []

    def run_node(self, n: fx.Node):
        target = n.target if n.op == "call_module" else getattr(n.target, "__name__", n.target)
        try:
            out = super().run_node(n)
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RuntimeError(f"op {target!r} fails: {msg}") from None
        if (
            n.op == "call_module"
            and isinstance(out, torch.Tensor)
            and n.args
            and isinstance(n.args[0], fx.Node)
        ):
            src = self.env.get(n.args[0])
            if (
                isinstance(src, torch.Tensor)
                and src.dim()
                and out.dim()
                and src.shape[0] != out.shape[0]
            ):
                if "Reshape" in type(self.module.get_submodule(str(n.target))).__name__:
                    self.batch_changes.append(
                        f"{target!r} turned batch {src.shape[0]} into {out.shape[0]}"
                    )
        return out


def run_located(
    model: nn.Module, x: torch.Tensor, batch_changes: list[str] | None = None
) -> torch.Tensor:
    """Forward pass whose errors name the failing op of the converted graph."""
    if isinstance(model, fx.GraphModule):
        interp = _LocatingInterpreter(model)
        try:
            out = interp.run(x)
        finally:
            if batch_changes is not None:
                batch_changes.extend(interp.batch_changes)
    else:
        out = model(x)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out


def _mask_layer_norms(dg: tp.DependencyGraph, group) -> list:
    """While probing: make each LayerNorm of the group normalise over the kept channels only.

    Zeroing a channel is not the same as removing it under a LayerNorm over that dimension
    (the zeros still count in its mean and variance), so without this every residual-stream
    group of a ConvNeXt/ViT would fail the zero-equivalence test although removing it is
    exact structural pruning. With the mask, a misaligned index mapping still fails.
    """
    handles = []
    for item in group:
        ln = item.dep.target.module
        if (
            not isinstance(ln, nn.LayerNorm)
            or len(ln.normalized_shape) != 1
            or not dg.is_out_channel_pruning_fn(item.dep.handler)
        ):
            continue
        width = int(ln.normalized_shape[0])
        keep = torch.ones(width, dtype=torch.bool)
        keep[torch.as_tensor(list(item.idxs), dtype=torch.long)] = False

        def hook(module: nn.LayerNorm, args, out, keep=keep):
            x = args[0]
            k = keep.to(x.device)
            xs = x[..., k]
            mean = xs.mean(-1, keepdim=True)
            var = xs.var(-1, unbiased=False, keepdim=True)
            y = (x - mean) / torch.sqrt(var + module.eps)
            if module.weight is not None:
                y = y * module.weight
            if module.bias is not None:
                y = y + module.bias
            return y * k

        handles.append(ln.register_forward_hook(hook))
    return handles


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def outputs_close(a: torch.Tensor, b: torch.Tensor) -> tuple[bool, float]:
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    scale = max(a.abs().max().item() if a.numel() else 0.0, 1e-6)
    return diff <= 1e-4 * scale + 1e-5, diff / scale


def probe_groups(
    model: nn.Module,
    example: torch.Tensor,
    batch: torch.Tensor,
    plan: Mapping[str, Sequence[int]],
    budget: AnalyseBudget | None = None,
    reference_shape: torch.Size | None = None,
) -> str | None:
    """Zero-equivalence test of removing `plan` = {root: idxs} all at once; None when safe,
    else why not (in terms of the op and the constraint that failed)."""
    m = copy.deepcopy(model)
    try:
        dg = build_dependency_graph(m, example)
        dg.budget = budget
        groups = [full_group(m, dg, root, idxs, minimum=1) for root, idxs in plan.items()]
    except UnboundedGroup as exc:
        return str(exc)
    except Exception as exc:
        return f"the dependency graph cannot form this group ({type(exc).__name__}: {_first_line(exc)})"
    expected: list[str] = []  # Reshapes that legitimately move the batch (MHA's [T, B*H, D])
    with torch.no_grad():
        unpruned = run_located(m, batch, expected)
    if reference_shape is None:
        reference_shape = unpruned.shape
    hooks = []
    try:
        for group in groups:
            zero_out_channels(dg, group)
            hooks.extend(_mask_layer_norms(dg, group))
        with torch.no_grad():
            zeroed = run_located(m, batch)
    except Exception as exc:
        for h in hooks:
            h.remove()
        return (
            "the dependency graph couples channels that do not line up "
            f"(e.g. through a transpose): {_first_line(exc)}"
        )
    for h in hooks:
        h.remove()
    try:
        for root, idxs in plan.items():
            full_group(m, dg, root, idxs, minimum=1).prune()
    except Exception as exc:
        return (
            f"Torch-Pruning cannot remove these channels ({type(exc).__name__}: {_first_line(exc)})"
        )
    changes: list[str] = []
    try:
        with torch.no_grad():
            pruned = run_located(m, batch, changes)
        changes = [c for c in changes if c not in expected]
    except Exception as exc:
        changes = [c for c in changes if c not in expected]
        if changes:
            return (
                f"its channel count is baked into the constant shape of Reshape {changes[0]} "
                f"once channels are removed, and then {_first_line(exc)}; re-export so that the "
                "reshape uses the runtime shape (or -1) to make it prunable"
            )
        return f"the pruned graph no longer runs: {_first_line(exc)}"
    if changes:
        return (
            f"its channel count is baked into the constant shape of Reshape {changes[0]} once channels "
            "are removed; re-export so that the reshape uses the runtime shape (or -1) to make it prunable"
        )
    if pruned.shape != reference_shape:
        return (
            f"removing its channels changes the model output shape {tuple(reference_shape)} -> "
            f"{tuple(pruned.shape)} (its channels are the model's outputs)"
        )
    ok, rel = outputs_close(zeroed, pruned)
    if not ok:
        return (
            "removing its channels changes the function beyond the removed channels "
            f"(relative difference {rel:.2e} versus zeroing them): the channel dimension is "
            "shared with a normalisation or reshape that is not channel-separable"
        )
    return None


def probe_group(
    model: nn.Module, example: torch.Tensor, batch: torch.Tensor, root: str, idxs: Sequence[int]
) -> str | None:
    """Zero-equivalence test of removing `idxs` of group `root`; None when safe, else why not."""
    return probe_groups(model, example, batch, {root: idxs})
