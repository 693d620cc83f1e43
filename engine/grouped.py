"""Grouped convolutions (RegNet, ResNeXt, ShuffleNet branches): keep channels-per-group consistent.

A Conv with 1 < groups < in_channels splits its channels into `groups` equal blocks and
needs every block to stay the same width. Torch-Pruning's conv pruner assumes exactly that
(it keeps the first `len(keep) // groups` input indices as the per-block pattern), so
removing an arbitrary set of channels broke the layer ("Given groups=25, expected weight to
be divisible by 25"). We therefore remove channels as *offsets*: offset j goes from every
block at once (channels j, j + w, j + 2w, ... with w = channels per block). Any requested
set is projected onto the nearest such set — the offsets most requested across blocks,
as many as the request covers on average — so every method, allocator and probe that
goes through `graph.full_group` keeps grouped convs valid.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn


@dataclass
class GroupedTie:
    """How a channel group meets a grouped conv: root index -> (offset, block)."""

    conv: str
    blocks: int
    per_block: int
    offset_of: dict[int, int]  # root index -> offset within its block

    def offsets(self) -> dict[int, list[int]]:
        by: dict[int, list[int]] = {}
        for root, off in self.offset_of.items():
            by.setdefault(off, []).append(root)
        return by


def is_grouped(m: nn.Module) -> bool:
    return isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and 1 < m.groups < m.in_channels


def ties_of(dg, full, names: dict[nn.Module, str]) -> list[GroupedTie]:
    """The grouped convs a full group (all root indices) passes through."""
    ties: list[GroupedTie] = []
    seen: set[tuple[int, bool]] = set()
    for item in full:
        target = item.dep.target.module
        if not isinstance(target, nn.Module) or not is_grouped(target):
            continue
        assert isinstance(target, (nn.Conv1d, nn.Conv2d, nn.Conv3d))  # is_grouped checked it
        out = dg.is_out_channel_pruning_fn(item.dep.handler)
        if (id(target), out) in seen:
            continue
        seen.add((id(target), out))
        width = target.out_channels if out else target.in_channels
        per = width // target.groups
        offset_of = {int(r): int(i) % per for i, r in zip(item.idxs, item.root_idxs, strict=False)}
        ties.append(
            GroupedTie(names.get(target, type(target).__name__), target.groups, per, offset_of)
        )
    return ties


def conflict(ties: Sequence[GroupedTie]) -> str | None:
    """Why the ties cannot be satisfied together, or None."""
    if len(ties) < 2:
        return None
    base = ties[0].offsets()
    base_sets = {frozenset(v) for v in base.values()}
    for t in ties[1:]:
        if {frozenset(v) for v in t.offsets().values()} != base_sets:
            return (
                f"grouped convolutions {ties[0].conv} (groups={ties[0].blocks}) and {t.conv} "
                f"(groups={t.blocks}) split these channels into different blocks, so no channel "
                "can be removed from every block of both at once"
            )
    return None


def project(ties: Sequence[GroupedTie], idxs: Sequence[int], minimum: int = 0) -> list[int]:
    """The closest set of root indices that removes whole offsets of the (first) grouped conv."""
    if not ties:
        return sorted(set(int(i) for i in idxs))
    tie = ties[0]
    requested = set(int(i) for i in idxs)
    covered = {r for r in requested if r in tie.offset_of}
    rest = requested - covered
    by_offset = tie.offsets()
    votes = Counter(tie.offset_of[r] for r in covered)
    n_off = int(round(len(covered) / max(tie.blocks, 1)))
    n_off = max(minimum if covered or minimum else 0, min(n_off, tie.per_block - 1))
    ranked = sorted(by_offset, key=lambda o: (-votes.get(o, 0), o))
    chosen = ranked[:n_off]
    out = set(rest)
    for o in chosen:
        out.update(by_offset[o])
    return sorted(out)
