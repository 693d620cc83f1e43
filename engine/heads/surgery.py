"""Head surgery: removing and zeroing whole heads, their zero-equivalence probe, head
groups for the analysis, plans, scores and report rows."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn

from engine.heads.find import HeadBlock, HeadSelect, find_blocks, is_head_group
from engine.reshapes import StaticReshape

# ------------------------------------------------------------------ surgery


def _keep_rows(linear: nn.Linear, keep: torch.Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.detach()[keep].clone())
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.detach()[keep].clone())
    linear.out_features = int(keep.numel())


def _keep_cols(linear: nn.Linear, keep: torch.Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.detach()[:, keep].clone())
    linear.in_features = int(keep.numel())


def remove_heads(model: nn.Module, block: HeadBlock, drop: Sequence[int]) -> HeadBlock:
    """Remove heads `drop` of `block` from `model` in place; returns the block's new description."""
    drop_set = {int(h) for h in drop}
    if not drop_set:
        return block
    if len(drop_set) >= block.heads:
        raise ValueError(f"{block.name}: cannot remove all {block.heads} heads")
    remap = {h: i for i, h in enumerate(h for h in range(block.heads) if h not in drop_set)}
    new_channels: dict[str, list[int]] = {}
    for name, row in block.channel_heads.items():
        keep = torch.tensor([i for i, h in enumerate(row) if h not in drop_set], dtype=torch.long)
        proj = model.get_submodule(name)
        assert isinstance(proj, nn.Linear)  # find_blocks only records Linear projections
        _keep_rows(proj, keep.to(proj.weight.device))
        new_channels[name] = [remap.get(h, -1) if h >= 0 else -1 for h in row if h not in drop_set]
    keep = torch.tensor(
        [i for i, h in enumerate(block.out_heads) if h not in drop_set], dtype=torch.long
    )
    out = model.get_submodule(block.out)
    assert isinstance(out, nn.Linear)  # find_blocks only records a Linear output projection
    _keep_cols(out, keep.to(out.weight.device))
    new_heads = block.heads - len(drop_set)
    for name, dim in block.reshapes.items():
        mod = model.get_submodule(name)
        assert isinstance(mod, StaticReshape)
        size = mod.shape[dim]
        if size % block.heads:
            raise ValueError(
                f"reshape {name}: dim {dim} of size {size} is not a multiple of {block.heads} heads"
            )
        mod.shape[dim] = size // block.heads * new_heads
    kept = torch.tensor(sorted(remap), dtype=torch.long)
    for name in block.selects:
        sel = model.get_submodule(name)
        assert isinstance(sel, HeadSelect)
        sel.keep = sel.keep[kept.to(sel.keep.device)]
    return HeadBlock(
        name=block.name,
        heads=new_heads,
        q=block.q,
        k=block.k,
        v=block.v,
        out=block.out,
        channel_heads=new_channels,
        out_heads=[remap[h] for h in block.out_heads if h not in drop_set],
        reshapes=dict(block.reshapes),
        selects=list(block.selects),
    )


def _zero_heads(model: nn.Module, block: HeadBlock, heads: Sequence[int]) -> None:
    """What removing the heads removes: their v channels (weights and bias)."""
    v = model.get_submodule(block.v)
    assert isinstance(v, nn.Linear)  # find_blocks only records Linear projections
    row = block.channel_heads[block.v]
    idx = torch.tensor(
        [i for i, h in enumerate(row) if h in set(heads)], dtype=torch.long, device=v.weight.device
    )
    with torch.no_grad():
        v.weight[idx] = 0.0
        if v.bias is not None:
            v.bias[idx] = 0.0


ATTR = "_prunery_head_blocks"


def blocks_of(model: nn.Module) -> dict[str, HeadBlock]:
    return getattr(model, ATTR, {}) or {}


def probe(
    model: nn.Module, block: HeadBlock, batch: torch.Tensor, heads: Sequence[int]
) -> str | None:
    """Zero-equivalence test of removing `heads`; None when safe, else why not."""
    from engine.graph import outputs_close, run_located

    m = copy.deepcopy(model)
    with torch.no_grad():
        reference = run_located(m, batch)
        _zero_heads(m, block, heads)
        zeroed = run_located(m, batch)
    try:
        remove_heads(m, block, heads)
        with torch.no_grad():
            pruned = run_located(m, batch)
    except Exception as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"removing heads breaks the graph: {text}"
    if pruned.shape != reference.shape:
        return f"removing heads changes the output shape {tuple(reference.shape)} -> {tuple(pruned.shape)}"
    ok, rel = outputs_close(zeroed, pruned)
    if not ok:
        return f"removing heads is not equivalent to silencing them (relative difference {rel:.2e})"
    return None


def analyse(model: nn.Module, example: torch.Tensor, batch: torch.Tensor, seed: int = 0):
    """Head groups proven by the probe (and recorded on the model), plus excluded ones with reasons."""
    from engine.graph import ChannelGroup, GroupMember

    groups, excluded = [], []
    gen = torch.Generator().manual_seed(seed)
    proven: dict[str, HeadBlock] = {}
    for block in find_blocks(model, example):  # type: ignore[arg-type]
        k = max(1, block.heads // 4)
        heads = sorted(torch.randperm(block.heads, generator=gen)[:k].tolist())
        reason = probe(model, block, batch, heads)
        if reason is not None:
            excluded.append((block.name, reason))
            continue
        proven[block.name] = block
        members = [
            GroupMember(n, "Linear", "out") for n in dict.fromkeys((block.q, block.k, block.v))
        ]
        members.append(GroupMember(block.out, "Linear", "in"))
        groups.append(ChannelGroup(block.name, block.heads, members))
    setattr(model, ATTR, proven)
    return groups, excluded


def apply_plan(
    model: nn.Module, plan: dict[str, Sequence[int]], blocks: dict[str, HeadBlock] | None = None
) -> dict[str, Sequence[int]]:
    """Remove the planned heads in place; returns the rest of the plan (channel groups).

    `blocks` describes `model` (pass the original's when `model` is a fresh deep copy: a
    GraphModule's deep copy does not carry plain attributes)."""
    blocks = blocks_of(model) if blocks is None else blocks
    rest: dict[str, Sequence[int]] = {}
    updated = dict(blocks)
    for name, idxs in plan.items():
        if is_head_group(name):
            if name not in blocks:
                raise KeyError(f"{name} is not a known attention block of this model")
            updated[name] = remove_heads(model, blocks[name], idxs)
        else:
            rest[name] = idxs
    setattr(model, ATTR, updated)
    return rest


def head_scores(
    model: nn.Module, name: str, per_module: Callable[[nn.Module], torch.Tensor | None]
) -> torch.Tensor:
    """Per-head sum of a per-output-channel statistic over q, k and v (L1 per head, ...)."""
    block = blocks_of(model)[name]
    total = torch.zeros(block.heads, dtype=torch.float64)
    for linear, row in block.channel_heads.items():
        values = per_module(model.get_submodule(linear))
        if values is None:
            continue
        heads = torch.tensor(row, dtype=torch.long)
        mask = heads >= 0
        total.index_add_(0, heads[mask], values.detach().double().cpu()[mask])
    return total


def heads_of(model: nn.Module) -> dict[str, int]:
    """Output projection name -> number of heads (for the report)."""
    return {b.out: b.heads for b in blocks_of(model).values()}


def report_rows(original: nn.Module, pruned: nn.Module) -> list:
    """One per-layer row per attention block: heads before → after (the `channels` columns
    count heads; the block's MACs are in its projections' rows)."""
    from prunery.report import LayerRow

    rows = []
    modules = dict(pruned.named_modules())
    for name, block in blocks_of(original).items():
        out_before = original.get_submodule(block.out)
        assert isinstance(out_before, nn.Linear)  # find_blocks only records a Linear output
        width = out_before.in_features
        new = modules.get(block.out)
        if not isinstance(new, nn.Linear):
            continue
        rows.append(
            LayerRow(
                name=name,
                op="attention heads",
                channels_before=block.heads,
                channels_after=new.in_features * block.heads // width,
                macs_before=0,
                macs_after=0,
            )
        )
    return rows
