"""Grouped convolutions (RegNet, ResNeXt, ShuffleNet branches): keep channels-per-group consistent.

A Conv with 1 < groups < in_channels splits its channels into `groups` equal blocks and
needs every block to stay the same width. Two ways to shrink one:

* **whole blocks** (a conv with in_channels == out_channels, as in RegNet and ResNeXt):
  block b's inputs feed only block b's outputs, so removing the block's input *and* output
  channels together drops one group and leaves every other block exactly as it was. The
  kernel shape per group is unchanged, so onnxruntime keeps running it on the same fast
  path: cutting RegNet's 16-wide groups down to 12 channels each (the other way) fell off
  the blocked kernels and made regnet_x_400mf 0.93x / 0.68x *slower* at half its MACs.
  `BlockGroupedConvPruner` couples the conv's input and output channels (as Torch-Pruning's
  own depthwise pruner does), so the producer before it and the consumers after it become
  one channel group, removed a block at a time.
* **offsets** (in != out): Torch-Pruning's conv pruner keeps the first
  `len(keep) // groups` input indices as the per-block pattern, so removing an arbitrary set
  of channels broke the layer ("Given groups=25, expected weight to be divisible by 25").
  Offset j goes from every block at once (channels j, j + w, j + 2w, ... with w = channels
  per block).

Any requested set is projected onto the nearest valid set — the cells (blocks or offsets)
most requested, as many as the request covers on average — so every method, allocator and
probe that goes through `graph.full_group` keeps grouped convs valid.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch_pruning as tp
from torch import nn


@dataclass
class GroupedTie:
    """How a channel group meets a grouped conv: root index -> its cell (the block it sits
    in for `kind == "block"`, its offset within its block for `kind == "offset"`). A valid
    removal is a union of whole cells."""

    conv: str
    blocks: int
    per_block: int
    cell_of: dict[int, int]  # root index -> cell
    kind: str = "offset"

    @property
    def quantum(self) -> int:
        """Channels one cell holds: removals come in multiples of it."""
        return self.per_block if self.kind == "block" else self.blocks

    @property
    def max_cells(self) -> int:
        """Cells that may go while the conv keeps at least one block and one channel each."""
        return (self.blocks if self.kind == "block" else self.per_block) - 1

    def cells(self) -> dict[int, list[int]]:
        by: dict[int, list[int]] = {}
        for root, cell in self.cell_of.items():
            by.setdefault(cell, []).append(root)
        return by


CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_grouped(m: nn.Module) -> bool:
    return isinstance(m, CONVS) and 1 < m.groups < m.in_channels


def takes_blocks(m: nn.Module) -> bool:
    """A grouped conv whose blocks can go whole: each block maps w channels to w channels."""
    return isinstance(m, CONVS) and is_grouped(m) and m.in_channels == m.out_channels


class BlockGroupedConvPruner(tp.pruner.function.ConvPruner):
    """Removes whole blocks of a grouped conv: input and output channels are coupled (the
    same indices), the per-group kernel is untouched and `groups` falls by one per block."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        assert isinstance(layer, CONVS)
        per = layer.out_channels // layer.groups
        gone = set(int(i) for i in idxs)
        whole = {
            b for b in {i // per for i in gone} if all(b * per + j in gone for j in range(per))
        }
        if len(gone) != len(whole) * per:
            raise ValueError(
                f"grouped convolution (groups={layer.groups}) can only lose whole blocks of {per} "
                f"channels; asked to remove {len(gone)} channels that do not form whole blocks"
            )
        keep = [i for i in range(layer.out_channels) if i // per not in whole]
        layer.out_channels = layer.in_channels = len(keep)
        layer.groups = len(keep) // per
        layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 0)
        if layer.bias is not None:
            layer.bias = self._prune_parameter_and_grad(layer.bias, keep, 0)
        return layer

    prune_in_channels = prune_out_channels


BLOCK_PRUNER = BlockGroupedConvPruner()


def block_pruners(model: nn.Module) -> dict[nn.Module, BlockGroupedConvPruner]:
    """Per-instance customized pruners (Torch-Pruning's `customized_pruners` hook) for every
    grouped conv that loses whole blocks."""
    return {m: BLOCK_PRUNER for m in model.modules() if takes_blocks(m)}


def ties_of(dg, full, names: dict[nn.Module, str]) -> list[GroupedTie]:
    """The grouped convs a full group (all root indices) passes through."""
    ties: list[GroupedTie] = []
    seen: set[tuple[int, bool]] = set()
    for item in full:
        target = item.dep.target.module
        if not isinstance(target, nn.Module) or not is_grouped(target):
            continue
        assert isinstance(target, (nn.Conv1d, nn.Conv2d, nn.Conv3d))  # is_grouped checked it
        block = dg.get_pruner_of_module(target) is BLOCK_PRUNER
        out = block or dg.is_out_channel_pruning_fn(item.dep.handler)
        if (id(target), out) in seen:
            continue
        seen.add((id(target), out))
        width = target.out_channels if out else target.in_channels
        per = width // target.groups
        pairs = zip(item.idxs, item.root_idxs, strict=False)
        cell_of = {int(r): (int(i) // per if block else int(i) % per) for i, r in pairs}
        ties.append(
            GroupedTie(
                names.get(target, type(target).__name__),
                target.groups,
                per,
                cell_of,
                "block" if block else "offset",
            )
        )
    return ties


def conflict(ties: Sequence[GroupedTie]) -> str | None:
    """Why the ties cannot be satisfied together, or None."""
    if len(ties) < 2:
        return None
    base_sets = {frozenset(v) for v in ties[0].cells().values()}
    for t in ties[1:]:
        if {frozenset(v) for v in t.cells().values()} != base_sets:
            return (
                f"grouped convolutions {ties[0].conv} (groups={ties[0].blocks}) and {t.conv} "
                f"(groups={t.blocks}) split these channels into different blocks, so no channel "
                "can be removed from every block of both at once"
            )
    return None


def project(ties: Sequence[GroupedTie], idxs: Sequence[int], minimum: int = 0) -> list[int]:
    """The closest set of root indices that removes whole cells of the (first) grouped conv."""
    if not ties:
        return sorted(set(int(i) for i in idxs))
    tie = ties[0]
    requested = set(int(i) for i in idxs)
    covered = {r for r in requested if r in tie.cell_of}
    rest = requested - covered
    by_cell = tie.cells()
    votes = Counter(tie.cell_of[r] for r in covered)
    n_cells = int(round(len(covered) / max(tie.quantum, 1)))
    n_cells = max(minimum if covered or minimum else 0, min(n_cells, tie.max_cells))
    ranked = sorted(by_cell, key=lambda c: (-votes.get(c, 0), c))
    out = set(rest)
    for c in ranked[:n_cells]:
        out.update(by_cell[c])
    return sorted(out)
