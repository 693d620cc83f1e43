"""Per-group steps (the fast set) and latency-aware allocation weights, from op timings."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from engine.graph import ChannelGroup
from engine.latency.ops import (
    NOISE_ABS_US,
    NOISE_REL,
    WEIGHT_MAX,
    OpSig,
    OpTimer,
    layer_sigs,
    nchwc_layout,
)

# ------------------------------------------------------------------ group profiles


@dataclass
class GroupProfile:
    name: str
    channels: int
    step: int
    times_us: dict[int, float]  # measured group time at probe widths
    macs: dict[int, int]
    weight: float = 1.0  # measured time saved per MAC, relative to the median group
    matmul_only: bool = False  # every layer is a Linear/MatMul (no blocked conv layouts)
    big: int = 1  # the coarse step S (widths in whole NCHWc blocks / GEMM panels)
    wide: int = 1  # the wide step 2S of a conv group at least 4S wide (`_wide_step`); else S
    align: int = 1  # any width of the group is a multiple of it (NCHWc conv input alignment)

    @property
    def time_per_mac(self) -> float | None:
        ws = sorted(self.times_us)
        if len(ws) < 2:
            return None
        lo, hi = ws[0], ws[-1]
        dm = self.macs[hi] - self.macs[lo]
        if dm <= 0:
            return None
        return max(self.times_us[hi] - self.times_us[lo], 0.0) / dm


def _group_layers(
    model: nn.Module, group: ChannelGroup, sigs: dict[str, OpSig]
) -> list[tuple[OpSig, bool, bool]]:
    """(signature, output channels follow the group, input channels follow the group)."""
    roles: dict[str, set[str]] = {}
    for m in group.members:
        if m.name in sigs:
            roles.setdefault(m.name, set()).add(m.role)
    return [(sigs[n], "out" in r, "in" in r) for n, r in roles.items()]


def _at_width(layers: list[tuple[OpSig, bool, bool]], channels: int, width: int) -> list[OpSig]:
    out = []
    f = width / channels
    for sig, o, i in layers:
        coupled = sig.depthwise or sig.blocked  # input and output channels go together
        cout = max(1, round(sig.cout * f)) if o or coupled else sig.cout
        cin = max(1, round(sig.cin * f)) if i or coupled else sig.cin
        out.append(sig.resized(cin, cout))
    return out


def _panel(channels: int) -> int:
    """GEMM panels of 8/16 columns (1: too narrow to step)."""
    return 16 if channels >= 48 else 8 if channels >= 16 else 1


def _big_step(channels: int, block: int = 1, matmul_only: bool = False) -> int:
    """The coarse step S of a group: GEMM panels of 8/16 columns, and for groups with convs
    at least the runtime's NCHWc block (`ops.nchwc_layout`): with a smaller step, widths
    between blocks are padded up to the next one and the layout breaks around pooling and
    residual adds."""
    panel = _panel(channels)
    if matmul_only or block <= 1 or channels < block:
        return panel
    return max(panel, block)


def _wide_step(channels: int, big: int, block: int, matmul_only: bool) -> int:
    """The wide step of a conv group: twice the coarse step S once the group spans four of
    them, else S. Small feature maps can reward widths in whole sets of blocks, not single
    blocks: onnxruntime 1.32 on an AVX2 CPU (block 8), batch 32 at 8x8, ran a 3x3 conv with
    32 in and out channels in 588 us, with 40 in 1230 us (x2.1 the time for x1.6 the MACs),
    and the zoo's vgg at half its MACs ran 1.44x faster with widths 24/24/48/48 than the
    original, 1.82x with 16/32/32/64. One-op timings at batch 1 do not show it (a few us of
    dispatch per op hide it). Halving some groups and leaving others whole costs accuracy
    (the service's digits net: 79% -> 62% after one recovery epoch; resnet_basic 99.7% ->
    98.1-98.6% after three), so `network.ensure_faster` tries this set only to rescue a
    pruned network that is slower than the original, timed whole network against whole
    network."""
    if matmul_only or block <= 1 or channels < 4 * big:
        return big
    return 2 * big


def _probe_step(channels: int, big: int, block: int) -> int:
    """The step the per-layer probe starts from. A conv group narrower than two blocks has
    no width between "uncut" and "one block" on the block grid; its probe starts from the
    GEMM panel instead, so the measured widths keep a finer choice (densenet's 16-channel
    growth layers left uncut put the whole cut on the others: -31 points at a quarter of the
    MACs) and the coarse widths (`LatencyProfile.mode == "coarse"`) keep the block grid."""
    if block > 1 and channels < 2 * block:
        return min(big, _panel(channels))
    return big


@dataclass
class LatencyProfile:
    """What the runtime rewards, per prunable group: its step and its time saved per MAC."""

    runtime: str
    batch: int
    threads: int | None
    groups: dict[str, GroupProfile]
    seconds: float
    ops_timed: int
    ops_cached: int
    timer: OpTimer | None = field(default=None, repr=False)
    block: int = 1  # onnxruntime's NCHWc channel block on this CPU (1: none)
    align: int = 1  # and the input-channel alignment of its blocked convs
    # Set by the never-slower loop: "measured" (default), "coarse" (step S everywhere),
    # "wide" (the wide step 2S of every conv group four steps S wide or more), plus
    # groups left uncut because their time hardly falls with width; by the budget search:
    # "fine" (the NCHWc alignment) and "exact" (steps of 1) when coarser steps miss it.
    mode: str = "measured"
    skip: set[str] = field(default_factory=set)

    def steps(self) -> dict[str, int]:
        if self.mode == "coarse":
            return {n: max(g.step, g.big) for n, g in self.groups.items()}
        if self.mode == "wide":
            return {n: max(g.step, g.wide) for n, g in self.groups.items()}
        if self.mode == "fine":
            return {n: g.align for n, g in self.groups.items()}
        if self.mode == "exact":
            return {n: 1 for n in self.groups}
        return {n: g.step for n, g in self.groups.items()}

    def has_wide(self) -> bool:
        """Whether the wide widths differ from the coarse ones (some group has a wide step)."""
        return any(g.wide > max(g.step, g.big) for g in self.groups.values())

    def align_of(self, name: str) -> int:
        """The width alignment of group `name` (1 for a group this profile does not know)."""
        group = self.groups.get(name)
        return group.align if group is not None else 1

    def weights(self) -> dict[str, float]:
        return {n: (0.0 if n in self.skip else g.weight) for n, g in self.groups.items()}

    def order_options(self, weighted: bool = True) -> dict[str, Any]:
        """Measured steps always; the time-per-MAC weights only when spending a latency
        budget: on MAC/param targets they moved the cut onto layers with few MACs and flat
        timings (vgg's hidden Linear 64 -> 7 channels, -40 points) for noise-level gains."""
        return {"steps": self.steps(), "weights": self.weights() if weighted else None}

    def flat_groups(self) -> list[str]:
        """Groups whose measured time hardly depends on the width (step 1), least time
        saved per MAC first: where an off-step width costs nothing."""
        flat = [
            g
            for g in self.groups.values()
            if g.name not in self.skip
            and (g.matmul_only if self.mode in ("coarse", "wide") else g.step == 1 or g.matmul_only)
        ]
        return [g.name for g in sorted(flat, key=lambda g: (not g.matmul_only, g.weight))]

    def summary(self) -> dict[str, Any]:
        counts: dict[int, int] = {}
        for s in self.steps().values():
            counts[s] = counts.get(s, 0) + 1
        return {
            "runtime": self.runtime,
            "nchwc_block": self.block,
            "nchwc_align": self.align,
            "batch": self.batch,
            "mode": self.mode,
            "steps": {str(k): v for k, v in sorted(counts.items())},
            "groups_left_uncut": sorted(self.skip),
            "seconds": round(self.seconds, 2),
            "ops_timed": self.ops_timed,
            "ops_cached": self.ops_cached,
            "per_group": {
                n: {
                    "channels": g.channels,
                    "step": g.step,
                    "weight": round(g.weight, 3),
                    "times_us": {str(w): round(t, 2) for w, t in sorted(g.times_us.items())},
                }
                for n, g in self.groups.items()
            },
        }


def profile(
    model: nn.Module,
    example: torch.Tensor,
    groups: Sequence[ChannelGroup],
    batch: int = 1,
    threads: int | None = None,
    timer: OpTimer | None = None,
    progress: Callable[[float], None] | None = None,
) -> LatencyProfile:
    t0 = time.perf_counter()
    timer = timer or OpTimer(batch=batch, threads=threads)
    sigs = layer_sigs(model, example)
    block, align = nchwc_layout(timer.provider)
    out: dict[str, GroupProfile] = {}
    for gi, g in enumerate(groups):
        if progress:
            progress(gi / max(len(groups), 1))
        layers = _group_layers(model, g, sigs)
        c = g.channels
        mm = bool(layers) and all(sig.kind == "matmul" for sig, _o, _i in layers)
        big = _big_step(c, block, mm)
        # Widths of a conv group off the alignment make its consumers fall back to plain NCHW.
        al = align if layers and not mm and block > 1 and c >= block else 1
        probe = _probe_step(c, big, block)
        wide = _wide_step(c, big, block, mm or not layers)
        if not layers or probe == 1:
            out[g.name] = GroupProfile(
                g.name, c, al, {}, {}, matmul_only=mm, big=big, wide=wide, align=al
            )
            continue
        m = max(probe, int(round(c / 2 / probe)) * probe)
        half = probe // 2
        widths = sorted({w for w in (c, m, m + 1, m + half) if 0 < w <= c})
        per = {w: _at_width(layers, c, w) for w in widths}
        flat = [s for w in widths for s in per[w]]
        ts = timer.times(flat)
        times, macs, k = {}, {}, 0
        for w in widths:
            n = len(per[w])
            times[w] = float(sum(ts[k : k + n]))
            macs[w] = int(sum(s.macs() for s in per[w]))
            k += n
        step = probe
        if c > m:
            slope = (times[c] - times[m]) / (c - m)
            for s, w in ((1, m + 1), (half, m + half)):
                if w not in times or w >= c:
                    continue
                line = times[m] + (w - m) * slope
                if times[w] <= line + NOISE_REL * times[m] + NOISE_ABS_US:
                    step = s
                    break
        step = max(step, al)
        out[g.name] = GroupProfile(
            g.name, c, step, times, macs, matmul_only=mm, big=big, wide=wide, align=al
        )
    rates = [r for r in (p.time_per_mac for p in out.values()) if r is not None and r > 0]
    med = statistics.median(rates) if rates else 0.0
    for prof in out.values():
        r = prof.time_per_mac
        if med > 0 and r is not None:
            prof.weight = float(min(WEIGHT_MAX, max(1.0 / WEIGHT_MAX, math.sqrt(r / med))))
    return LatencyProfile(
        runtime=timer.runtime,
        batch=batch,
        threads=threads,
        groups=out,
        seconds=time.perf_counter() - t0,
        ops_timed=timer.timed,
        ops_cached=timer.cached,
        timer=timer,
        block=block,
        align=align,
    )


def layer_latency(
    timer: OpTimer, before: dict[str, OpSig], after: dict[str, OpSig]
) -> dict[str, tuple[float, float]]:
    """Per layer: measured one-op time (µs) at the original and at the pruned shape, the two
    timed in one interleaved series (`OpTimer.paired_times`)."""
    names = [n for n in before if n in after]
    ts = timer.paired_times([(before[n], after[n]) for n in names])
    return dict(zip(names, ts, strict=True))
