"""Meeting the budget by search, not by hope.

A method scores channels; the allocator turns scores into one *removal order* — a list of
chunks (group, channel indices), cheapest first — and binary-searches the length of the
prefix to remove so that the kept fraction of MACs (or parameters), measured on the
actually pruned network, lands as close as possible to the target. MACs fall
monotonically along the order, so ~log2(#chunks) prunings are enough.

Orders:
* uniform — every group shrinks by the same fraction (Li et al.'s predefined ratios);
  within a group, lowest scores first.
* global — one ranking of scores normalised per group (each divided by its group's mean),
  so layers lose different fractions (Network Slimming's global threshold, PFS).

A chunk is `round_to` channels, so widths stay multiples of it. No group is emptied:
each keeps at least max(round_to, (1 - max_layer_ratio) x its width) channels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from core.errors import BadSpec, EngineError
from engine.flops import Costs, torch_costs
from engine.graph import ChannelGroup, prune_copy

Plan = dict[str, list[int]]


class BudgetUnreachable(EngineError):
    code = "budget_unreachable"


@dataclass
class Chunk:
    group: str
    idxs: list[int]
    key: float


@dataclass
class BudgetResult:
    plan: Plan
    model: nn.Module
    kept: float  # fraction of the original metric kept (torch count)
    costs: Costs
    evaluations: int


def _chunks_for_group(
    group: ChannelGroup, order: Sequence[int], round_to: int, max_ratio: float
) -> list[list[int]]:
    c = group.channels
    keep_min = max(round_to, math.ceil(c * (1.0 - max_ratio)))
    removable = max(0, c - keep_min)
    chunks: list[list[int]] = []
    pos = 0
    first = c % round_to
    size = first if first else round_to
    while pos + size <= removable:
        chunks.append(list(order[pos : pos + size]))
        pos += size
        size = round_to
    return chunks


def _order(group: ChannelGroup, s: torch.Tensor) -> list[int]:
    """Lowest score first; for a group with cells (grouped.py), whole cells in the order of
    their mean score, so that chunks of a multiple of the quantum are exactly whole cells."""
    if group.cells and sum(len(c) for c in group.cells) == group.channels:
        means = [float(s[c].mean()) for c in group.cells]
        ranked = sorted(range(len(group.cells)), key=lambda k: (means[k], k))
        return [i for k in ranked for i in sorted(group.cells[k], key=lambda i: (float(s[i]), i))]
    return torch.argsort(s, stable=True).tolist()


def removal_order(
    groups: Sequence[ChannelGroup],
    scores: dict[str, torch.Tensor],
    allocation: str,
    round_to: int = 1,
    max_ratio: float = 0.9,
    steps: dict[str, int] | None = None,
    weights: dict[str, float] | None = None,
) -> list[Chunk]:
    """`steps`: a measured step per group (replaces round_to); `weights`: measured time saved
    per MAC per group (keys are divided by it; 0 leaves the group uncut). See latency.py."""
    chunks: list[Chunk] = []
    for gi, group in enumerate(groups):
        weight = 1.0 if weights is None else weights.get(group.name, 1.0)
        if weight <= 0.0:
            continue
        s = scores[group.name].double()
        if s.numel() != group.channels:
            raise EngineError(
                f"method scored {s.numel()} channels of {group.name}, which has {group.channels}"
            )
        order = _order(group, s)
        mean = float(s.abs().mean()) or 1.0
        removed = 0
        step = round_to if steps is None else steps.get(group.name, round_to)
        # A grouped conv's channels go a block (or offset) at a time: chunks of whole cells.
        step = group.quantum * math.ceil(max(step, 1) / group.quantum)
        for chunk in _chunks_for_group(group, order, step, max_ratio):
            removed += len(chunk)
            if allocation == "uniform":
                # The chunk's middle: widths round to the nearest step, not always down (a
                # 32-channel group with a step of 16 loses 16 at a 30% cut, not 0).
                key = (removed - len(chunk) / 2) / group.channels / weight + gi * 1e-9
            elif allocation == "global":
                key = float(s[chunk].max()) / mean / weight + gi * 1e-12
            else:
                raise BadSpec(f"unknown allocation {allocation!r}; use 'uniform' or 'global'")
            chunks.append(Chunk(group.name, chunk, key))
    if allocation == "global":
        # Keys are monotone within a group, so sorting keeps each group's own order.
        pass
    chunks.sort(key=lambda ch: ch.key)
    return chunks


def plan_of(chunks: Sequence[Chunk]) -> Plan:
    plan: Plan = {}
    for ch in chunks:
        plan.setdefault(ch.group, []).extend(ch.idxs)
    return plan


def search(
    model: nn.Module,
    example: torch.Tensor,
    chunks: Sequence[Chunk],
    metric: str,
    target: float,
    base: Costs,
    progress: Callable[[float], None] | None = None,
    tolerance: float = 0.01,
    split_last: bool = False,
    prefer: Sequence[str] = (),
    widths: Mapping[str, tuple[int, int, int]] | None = None,
) -> BudgetResult:
    """Binary search of the prefix of `chunks` whose removal keeps `target` of `metric`.
    `split_last`: when whole chunks straddle the tolerance, cut part of one group's next
    chunk (see `_split_finish`; `prefer` orders the groups tried; `widths` says which
    partial cuts it may make)."""

    def kept_fraction(costs: Costs) -> float:
        return costs.macs / base.macs if metric == "flops" else costs.params / base.params

    cache: dict[int, tuple[float, nn.Module, Costs]] = {}

    broken: dict[int, str] = {}

    def evaluate(n: int) -> float:
        if n not in cache:
            try:
                pruned = prune_copy(model, example, plan_of(chunks[:n]))
                costs = torch_costs(pruned, example)
            except Exception as exc:
                # A prefix can empty a channel slice shared by several groups (each group keeps
                # its minimum, yet none of the kept channels fall in that slice): treat it as
                # "removed too much" so the search backs off to a smaller prefix.
                broken[n] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                cache[n] = (0.0, None, None)  # type: ignore[assignment]
                return 0.0
            cache[n] = (kept_fraction(costs), pruned, costs)
            if progress:
                progress(min(1.0, len(cache) / (2 * math.log2(len(chunks) + 2) + 2)))
        return cache[n][0]

    lo, hi = 0, len(chunks)
    if evaluate(hi) > target and hi not in broken:
        best = cache[hi][0]
        raise BudgetUnreachable(
            f"the target keeps {target:.1%} of the {'MACs' if metric == 'flops' else 'parameters'}, "
            f"but removing every channel that can be removed safely still keeps {best:.1%}; "
            "raise the target, or see the excluded layers for what cannot be pruned"
        )
    if evaluate(lo) <= target:
        hi = 0
    # Invariant: evaluate(hi) <= target < evaluate(lo)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if evaluate(mid) <= target:
            hi = mid
        else:
            lo = mid
    candidates = [n for n in (lo, hi) if n in cache and n not in broken]
    if not candidates:
        raise EngineError(
            f"every pruning the budget search tried breaks the model ({broken[min(broken)]})"
        )
    best_n = min(candidates, key=lambda n: abs(cache[n][0] - target))
    kept, pruned, costs = cache[best_n]
    best_plan = plan_of(chunks[:best_n])
    if abs(kept - target) > tolerance and hi > lo:
        found = _straddle_variant(model, example, chunks, lo, target, tolerance, kept_fraction)
        if found is None and split_last:
            found = _split_finish(
                model, example, chunks, lo, target, tolerance, kept_fraction, prefer, widths
            )
        if found is not None:
            best_plan, pruned, kept, costs = found
    return BudgetResult(best_plan, pruned, kept, costs, len(cache))


def _split_finish(
    model: nn.Module,
    example: torch.Tensor,
    chunks: Sequence[Chunk],
    lo: int,
    target: float,
    tolerance: float,
    kept_fraction: Callable[[Costs], float],
    prefer: Sequence[str] = (),
    widths: Mapping[str, tuple[int, int, int]] | None = None,
) -> tuple[Plan, nn.Module, float, Costs] | None:
    """Coarse (hardware-friendly) chunks straddle the target: remove only part of one
    group's next chunk — the lowest-scored channels of it, binary-searched — so exactly one
    group gets an off-step width and every other keeps its fast one. Groups named in
    `prefer` (those whose measured time does not care about the width) are tried first.
    `widths[group] = (channels, quantum, align)`: a partial cut removes a multiple of the
    quantum (whole cells of a grouped conv) and leaves a width that is a multiple of align
    (onnxruntime runs a conv whose input width is off its NCHWc alignment in the plain,
    slower layout: one off-step width made a whole resnet stage slower than the original)."""
    widths = widths or {}
    removed: dict[str, int] = {}
    for ch in chunks[:lo]:
        removed[ch.group] = removed.get(ch.group, 0) + len(ch.idxs)
    rest: dict[str, list[int]] = {}  # each group's channels after the prefix, in its order
    first: dict[str, int] = {}
    for j, ch in enumerate(chunks[lo:], start=lo):
        rest.setdefault(ch.group, []).extend(ch.idxs)
        first.setdefault(ch.group, j)
    rank = {g: i for i, g in enumerate(prefer)}
    for name in sorted(rest, key=lambda g: (rank.get(g, len(rank)), first[g])):
        # A preferred group may give any number of its remaining channels; any other group
        # only part of its next chunk (its width stays within one step of its fast set).
        idxs = rest[name] if name in rank else chunks[first[name]].idxs
        if len(idxs) < 2 and name not in rank:
            continue
        ch = Chunk(name, idxs, chunks[first[name]].key)
        channels, quantum, align = widths.get(name, (0, 1, 1))
        left = channels - removed.get(name, 0)  # the group's width before the cut
        ks = [
            k
            for k in range(1, len(ch.idxs) + (name in rank))
            if k % max(quantum, 1) == 0 and (not channels or (left - k) % max(align, 1) == 0)
        ]
        lo_i, hi_i = -1, len(ks)  # kept(no cut) > target
        best: tuple[Plan, nn.Module, float, Costs] | None = None
        while hi_i - lo_i > 1:
            i = (lo_i + hi_i) // 2
            k = ks[i]
            plan = plan_of([*chunks[:lo], Chunk(ch.group, ch.idxs[:k], ch.key)])
            try:
                variant = prune_copy(model, example, plan)
                vcosts = torch_costs(variant, example)
            except Exception:
                break
            vkept = kept_fraction(vcosts)
            if abs(vkept - target) <= tolerance:
                best = (plan, variant, vkept, vcosts)
                break
            if vkept > target:
                lo_i = i
            else:
                hi_i = i
        if best is not None:
            return best
    return None


def _straddle_variant(
    model: nn.Module,
    example: torch.Tensor,
    chunks: Sequence[Chunk],
    lo: int,
    target: float,
    tolerance: float,
    kept_fraction: Callable[[Costs], float],
) -> tuple[Plan, nn.Module, float, Costs] | None:
    """Coarse chunks (round_to, tiny layers) can straddle the target. Try the prefix plus
    the *next* chunk of another group instead of the next chunk in the order. A variant is
    taken only when it lands within the tolerance: jumping ahead in the order bends the
    allocation (uniform stops being uniform), which costs accuracy, and is not worth it
    merely to get closer."""
    seen: set[str] = set()
    for j, ch in enumerate(chunks[lo:], start=lo):
        if ch.group in seen:
            continue
        seen.add(ch.group)
        if j == lo:
            continue
        plan = plan_of([*chunks[:lo], ch])
        try:
            variant = prune_copy(model, example, plan)
            vcosts = torch_costs(variant, example)
        except Exception:
            continue
        vkept = kept_fraction(vcosts)
        if abs(vkept - target) <= tolerance:
            return plan, variant, vkept, vcosts
    return None


def explicit_plan(
    groups: Sequence[ChannelGroup],
    scores: dict[str, torch.Tensor],
    ratios: dict[str, float],
    round_to: int,
    sources: Mapping[str, str] | None = None,
) -> Plan:
    """target.layers: {layer name: ratio to remove}. A name may be a group root or any
    layer whose output channels belong to the group, by the engine's name or by its source
    module path (`sources`: engine name -> source path, `LoadedModel.source_names`)."""
    sources = sources or {}
    by_layer: dict[str, ChannelGroup] = {}
    for g in groups:
        by_layer[g.name] = g
        for layer in g.out_layers:
            by_layer.setdefault(layer, g)
    # A source path names a layer only when exactly one engine layer carries it.
    by_source: dict[str, list[str]] = {}
    for engine_name, src in sources.items():
        if engine_name in by_layer:
            by_source.setdefault(src, []).append(engine_name)
    plan: Plan = {}
    for name, ratio in ratios.items():
        group = by_layer.get(name)
        if group is None and len(by_source.get(name, ())) == 1:
            group = by_layer[by_source[name][0]]
        if group is None:
            known = ", ".join(sorted(g.name for g in groups)[:20])
            named = sorted({sources[g.name] for g in groups if g.name in sources})[:20]
            raise BadSpec(
                f"target.layers names {name!r}, which is not a prunable layer; prunable layers: {known}"
                + (f"; or by their source names: {', '.join(named)}" if named else "")
            )
        n = int(round(group.channels * ratio / round_to)) * round_to
        n = min(n, group.channels - max(1, round_to))
        order = torch.argsort(scores[group.name].double(), stable=True).tolist()
        plan[group.name] = order[:n]
    return plan


def apply_plan(model: nn.Module, example: torch.Tensor, plan: Plan) -> nn.Module:
    return prune_copy(model, example, plan)
