"""Widening the uploaded graph (Pruning from Scratch's width multiplier `expand`).

The authors learn the gates on a wider network than the one they finally train. Here every
prunable group of C channels gets round(C * factor) channels: new channel C + t is a copy
of channel t mod C. The copy is structural only — Pruning from Scratch re-initialises every
weight afterwards — so what matters is where each new channel enters every layer:

* a layer producing the group's channels (out member) gets new output rows at the end;
* a layer consuming them (in member) gets new input columns right after the block of its
  inputs that belongs to the group (a concat places the producer's new channels after its
  old ones; a flatten places them after its old ones, H*W features each), in the same
  order, so producer and consumer agree;
* a depthwise conv (in and out member) grows its groups with its channels.

A group with a parametric member other than Conv/Linear (a LayerNorm, an unwrapped
parameter) is left at its width. The widened network is checked by one forward pass.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from core.errors import NotApplicable
from engine.flops import torch_costs
from engine.graph import PRUNABLE_ROOTS, ChannelGroup, full_group

_Root = nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear
_NON_PARAMETRIC = (nn.ReLU, nn.GELU, nn.Identity, nn.Dropout, nn.MaxPool2d, nn.AvgPool2d)


def _is_depthwise(m: nn.Module) -> bool:
    return (
        isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
        and m.groups > 1
        and m.groups == m.in_channels
    )


def _insert(t: torch.Tensor, dim: int, pos: int, extra: torch.Tensor) -> torch.Tensor:
    head, tail = t.narrow(dim, 0, pos), t.narrow(dim, pos, t.shape[dim] - pos)
    return torch.cat([head, extra, tail], dim)


def expand_groups(
    model: nn.Module, example: torch.Tensor, dg, groups: list[ChannelGroup], factor: float
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Widen `model` in place. Returns ({group: original root channel of each new root
    channel}, groups left at their width)."""
    # (module, role) -> list of (insert position, source positions)
    plan: dict[tuple[int, str], tuple[_Root, list[tuple[int, list[int]]]]] = {}
    origin: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for g in groups:
        c = g.channels
        extra = int(round(c * factor)) - c
        origin[g.name] = torch.arange(c)
        if extra <= 0:
            continue
        items = []
        ok = True
        for item in full_group(model, dg, g.name):
            target = item.dep.target.module
            if isinstance(target, PRUNABLE_ROOTS):
                items.append((target, bool(dg.is_out_channel_pruning_fn(item.dep.handler)), item))
            elif isinstance(target, nn.Parameter) or (
                isinstance(target, nn.Module)
                and any(True for _ in target.parameters(recurse=False))
                and not isinstance(target, _NON_PARAMETRIC)
            ):
                ok = False
        if not ok:
            skipped.append(g.name)
            continue
        sources = [t % c for t in range(extra)]
        for module, is_out, item in items:
            by_root: dict[int, list[int]] = {}
            for i, r in zip(list(item.idxs), list(item.root_idxs), strict=True):
                by_root.setdefault(int(r), []).append(int(i))
            if is_out:
                pos = module.weight.shape[0]
            else:
                pos = max(int(i) for i in item.idxs) + 1
            src = [i for s in sources for i in sorted(by_root.get(s, []))]
            role = "out" if is_out else "in"
            entry = plan.setdefault((id(module), role), (module, []))
            if all(p != pos for p, _ in entry[1]):
                entry[1].append((pos, src))
        origin[g.name] = torch.cat([torch.arange(c), torch.tensor(sources, dtype=torch.long)])
    with torch.no_grad():
        for (_, role), (module, inserts) in plan.items():
            if role == "in" and _is_depthwise(module):
                continue  # its out role carries the growth
            dim = 0 if role == "out" else 1
            w = module.weight.detach()
            b = module.bias.detach() if module.bias is not None else None
            for pos, src in sorted(inserts, reverse=True):
                idx = torch.tensor(src, dtype=torch.long)
                w = _insert(w, dim, pos, w.index_select(dim, idx))
                if role == "out" and b is not None:
                    b = _insert(b, 0, pos, b.index_select(0, idx))
            module.weight = nn.Parameter(w.clone())
            if b is not None and role == "out":
                module.bias = nn.Parameter(b.clone())
            if isinstance(module, nn.Linear):
                module.out_features, module.in_features = module.weight.shape
            else:
                if role == "out":
                    module.out_channels = module.weight.shape[0]
                    if _is_depthwise_after(module):
                        module.in_channels = module.groups = module.out_channels
                else:
                    module.in_channels = module.weight.shape[1] * module.groups
    try:
        with torch.no_grad():
            model(example)
    except Exception as exc:
        raise NotApplicable(
            f"expand={factor}: the widened network does not run ({type(exc).__name__}: {exc}); use expand = 1"
        ) from None
    return origin, skipped


def _is_depthwise_after(m: nn.Module) -> bool:
    # a depthwise conv whose rows grew: groups still equals the old in_channels
    return (
        isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
        and m.groups > 1
        and m.groups == m.in_channels
    )


def expanded_context(ctx, net: nn.Module, factor: float):
    """(context over the widened net, widened net, origin map) for gate learning."""
    dg = ctx.dependency_graph(net)
    origin, skipped = expand_groups(net, ctx.example, dg, list(ctx.groups), factor)
    groups = [ChannelGroup(g.name, int(origin[g.name].numel()), g.members) for g in ctx.groups]
    analysis = dataclasses.replace(ctx.analysis, groups=groups)
    wide = dataclasses.replace(
        ctx, model=net, analysis=analysis, base_costs=torch_costs(net, ctx.example)
    )
    return wide, net, origin, skipped
