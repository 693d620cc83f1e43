"""Latency-first pruning: widths that run fast, latency budgets, and never a slower model.

Fewer MACs are not a speedup by themselves. onnxruntime's CPU kernels work on blocks of
channels (NCHWc blocks of 8/16, GEMM panels of 16): a convolution with 47 output channels
costs what one with 48 costs, and a depthwise convolution with an odd width can be 2-3x
slower than one with a width that is a multiple of 8. So this module *measures*:

* **Op timings.** Each Conv/Linear layer becomes a one-node ONNX graph with the layer's real
  shapes (input size, kernel, stride, groups) at the job's latency batch, timed in
  onnxruntime (the runtime the report measures): `WARMUP` warm-up runs, then `RUNS` timed
  runs interleaved across the widths being compared, median. Timings are cached on disk per
  (op shape, runtime version, execution provider, CPU, threads, batch) in
  `$PRUNERY_LATENCY_CACHE` (default `$PRUNERY_HOME/cache/latency.json`).
* **Per-group steps (the "fast set").** For each prunable group of width c, the group's
  layers (producers with w output channels, consumers with w input channels, depthwise
  layers with w of both) are timed at 4 widths: c, m (a multiple of the big step S near
  c/2), m+1 and m+S/2. Time between m and c is close to linear in the width for a kernel
  without blocking; a width is "fast" when it costs no more than that line (plus noise).
  The group's step is the smallest of (1, S/2, S) whose probe width is fast: its widths are
  then multiples of that step. Cost: at most 4 one-op timings per layer and group.
* **Latency-aware allocation.** The same timings give each group's measured time saved per
  MAC removed; dividing the removal order's keys by its square root (normalised to the
  median group, clipped to [1/2, 2]) makes the budget go where it buys the most time.
* **Latency targets.** `target.latency = F` binary-searches the removal order's prefix
  against the *measured* latency of the really pruned network, exported to ONNX and timed
  alternately with the original (median of interleaved runs).
* **Never slower.** After pruning, the exported network is timed against the original at
  every reported batch size; if it is slower, the widths are chosen again — first with the
  coarse step S everywhere, then without the groups whose time hardly falls with width —
  and the fastest result is kept. The `gates.min_speedup` gate reports what remains.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from workers.engine.graph import ChannelGroup

RUNS = 15  # timed runs per op and width (interleaved), after WARMUP
WARMUP = 3
SEARCH_RUNS = 20  # interleaved whole-network runs per latency-search evaluation
NOISE_REL, NOISE_ABS_US = 0.04, 2.0  # what counts as "no slower than the line"
# Latency-aware allocation: a group's keys are divided by sqrt(its measured time saved per
# MAC / the median group's), clipped to [1/WEIGHT_MAX, WEIGHT_MAX] — a nudge, not a takeover:
# one-op timings of small layers are noisy, and very uneven cuts cost accuracy.
WEIGHT_MAX = 2.0
GATE_NOISE = 0.03  # min_speedup allows this much measurement noise (stated in the gate)


# ------------------------------------------------------------------ op signatures


@dataclass(frozen=True)
class OpSig:
    """One Conv or Linear (MatMul) layer at batch 1: everything that decides its run time."""

    kind: str  # "conv" | "matmul"
    cin: int
    cout: int
    spatial: tuple[int, ...]  # conv: input spatial size; matmul: leading dims after batch
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1

    @property
    def depthwise(self) -> bool:
        return self.kind == "conv" and self.groups > 1 and self.groups == self.cin == self.cout

    def key(self, batch: int) -> str:
        return (
            f"{self.kind}|b{batch}|{self.cin}x{self.cout}|s{self.spatial}|k{self.kernel}|st{self.stride}"
            f"|p{self.pads}|d{self.dilation}|g{self.groups}"
        )

    def macs(self) -> int:
        if self.kind == "matmul":
            return int(np.prod(self.spatial or (1,))) * self.cin * self.cout
        out_sp = [
            (s + self.pads[i] + self.pads[i + len(self.spatial)] - self.dilation[i] * (self.kernel[i] - 1) - 1)
            // self.stride[i] + 1
            for i, s in enumerate(self.spatial)
        ]
        return int(np.prod(out_sp)) * self.cout * (self.cin // self.groups) * int(np.prod(self.kernel))

    def resized(self, cin: int, cout: int) -> OpSig:
        groups = self.groups
        if self.depthwise:
            cin = cout = groups = max(cin, cout)
        elif groups > 1:  # grouped: keep the group count, widths multiples of it
            cin = max(groups, cin // groups * groups)
            cout = max(groups, cout // groups * groups)
        return OpSig(self.kind, cin, cout, self.spatial, self.kernel, self.stride, self.pads, self.dilation, groups)


def _tuple(v: Any, n: int) -> tuple[int, ...]:
    return tuple(int(x) for x in v) if isinstance(v, (tuple, list)) else (int(v),) * n


def layer_sigs(model: nn.Module, example: torch.Tensor) -> dict[str, OpSig]:
    """OpSig of every Conv1d/Conv2d/Linear module, from one forward pass at batch 1."""
    sigs: dict[str, OpSig] = {}
    hooks = []

    def hook(name: str, mod: nn.Module):
        def fn(_m, inputs, _out):
            x = inputs[0]
            if not isinstance(x, torch.Tensor):
                return
            if isinstance(mod, nn.Linear):
                sigs[name] = OpSig("matmul", mod.in_features, mod.out_features, tuple(int(d) for d in x.shape[1:-1]))
                return
            n = x.dim() - 2
            padding = mod.padding
            if isinstance(padding, str):  # 'same' / 'valid'
                k = _tuple(mod.kernel_size, n)
                pads = tuple((kk - 1) // 2 for kk in k) * 2 if padding == "same" else (0,) * (2 * n)
            else:
                p = _tuple(padding, n)
                pads = p + p
            sigs[name] = OpSig(
                "conv", mod.in_channels, mod.out_channels, tuple(int(d) for d in x.shape[2:]),
                _tuple(mod.kernel_size, n), _tuple(mod.stride, n), pads, _tuple(mod.dilation, n), int(mod.groups),
            )
        return fn

    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Linear)) and not (
            isinstance(mod, (nn.Conv1d, nn.Conv2d)) and mod.padding_mode != "zeros"
        ):
            hooks.append(mod.register_forward_hook(hook(name, mod)))
    param = next(model.parameters(), None)
    try:
        with torch.no_grad():
            model(example[:1].to(param.device) if param is not None else example[:1])
    finally:
        for h in hooks:
            h.remove()
    return sigs


def _op_model(sig: OpSig, batch: int) -> bytes:
    rng = np.random.default_rng(0)
    if sig.kind == "matmul":
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, *sig.spatial, sig.cin])
        w = numpy_helper.from_array(rng.standard_normal((sig.cin, sig.cout)).astype(np.float32), "w")
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
    else:
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, sig.cin, *sig.spatial])
        w = numpy_helper.from_array(
            rng.standard_normal((sig.cout, sig.cin // sig.groups, *sig.kernel)).astype(np.float32), "w"
        )
        node = helper.make_node(
            "Conv", ["x", "w"], ["y"], pads=list(sig.pads), strides=list(sig.stride),
            dilations=list(sig.dilation), group=sig.groups,
        )
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    model = helper.make_model(helper.make_graph([node], "op", [x], [y], [w]), opset_imports=[helper.make_opsetid("", 17)])
    return model.SerializeToString()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def default_cache_path() -> Path:
    explicit = os.environ.get("PRUNERY_LATENCY_CACHE")
    if explicit:
        return Path(explicit)
    home = Path(os.environ.get("PRUNERY_HOME") or Path.home() / ".prunery")
    return home / "cache" / "latency.json"


def session(model: bytes, threads: int | None, provider: str = "CPUExecutionProvider"):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(model, opts, providers=[provider])


class OpTimer:
    """Median onnxruntime time (µs) of one-op graphs, cached on disk."""

    def __init__(self, batch: int = 1, threads: int | None = None, provider: str = "CPUExecutionProvider",
                 cache_path: Path | None = None, runs: int = RUNS) -> None:
        import onnxruntime as ort

        self.batch, self.threads, self.provider, self.runs = batch, threads, provider, runs
        self.runtime = f"onnxruntime {ort.__version__} {provider} | {_cpu_name()} | threads {threads or 'default'}"
        self.cache_path = cache_path or default_cache_path()
        self.timed = 0
        self.cached = 0
        self._cache: dict[str, float] = self._load().get(self.runtime, {})

    def _load(self) -> dict[str, dict[str, float]]:
        try:
            data = json.loads(self.cache_path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _save(self) -> None:
        try:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            data = self._load()  # another job may have added entries meanwhile
            data.setdefault(self.runtime, {}).update(self._cache)
            fd, tmp = tempfile.mkstemp(prefix=".latency.", suffix=".tmp", dir=self.cache_path.parent)
            with os.fdopen(fd, "w") as fh:
                json.dump(data, fh)
            os.replace(tmp, self.cache_path)
        except OSError:
            pass  # a read-only home only costs re-measurement

    def times(self, sigs: Sequence[OpSig]) -> list[float]:
        keys = [s.key(self.batch) for s in sigs]
        todo = {k: s for k, s in zip(keys, sigs, strict=True) if k not in self._cache}
        self.cached += len(keys) - len(todo)
        items = list(todo.items())
        for i in range(0, len(items), 8):  # a few sessions at a time, timed in alternation
            self._measure(items[i : i + 8])
        if todo:
            self._save()
        return [self._cache[k] for k in keys]

    def _measure(self, items: list[tuple[str, OpSig]]) -> None:
        rng = np.random.default_rng(0)
        runs = []
        for _key, sig in items:
            shape = [self.batch, *sig.spatial, sig.cin] if sig.kind == "matmul" else [self.batch, sig.cin, *sig.spatial]
            sess = session(_op_model(sig, self.batch), self.threads, self.provider)
            x = rng.standard_normal(shape).astype(np.float32)
            for _ in range(WARMUP):
                sess.run(None, {"x": x})
            runs.append((sess, x, []))
        for _ in range(self.runs):
            for sess, x, ts in runs:
                t0 = time.perf_counter()
                sess.run(None, {"x": x})
                ts.append((time.perf_counter() - t0) * 1e6)
        for (key, _sig), (_s, _x, ts) in zip(items, runs, strict=True):
            self._cache[key] = float(statistics.median(ts))
        self.timed += len(items)


# ------------------------------------------------------------------ group profiles


@dataclass
class GroupProfile:
    name: str
    channels: int
    step: int
    times_us: dict[int, float]  # measured group time at probe widths
    macs: dict[int, int]
    weight: float = 1.0  # measured time saved per MAC, relative to the median group

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


def _group_layers(model: nn.Module, group: ChannelGroup, sigs: dict[str, OpSig]) -> list[tuple[OpSig, bool, bool]]:
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
        cout = max(1, round(sig.cout * f)) if o or sig.depthwise else sig.cout
        cin = max(1, round(sig.cin * f)) if i or sig.depthwise else sig.cin
        out.append(sig.resized(cin, cout))
    return out


def _big_step(channels: int) -> int:
    return 16 if channels >= 48 else 8 if channels >= 16 else 1


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
    # Set by the never-slower loop: "measured" (default), "coarse" (step S everywhere), plus
    # groups left uncut because their time hardly falls with width.
    mode: str = "measured"
    skip: set[str] = field(default_factory=set)

    def steps(self) -> dict[str, int]:
        if self.mode == "coarse":
            return {n: max(g.step, _big_step(g.channels)) for n, g in self.groups.items()}
        if self.mode == "fine":
            return {n: 1 for n in self.groups}
        return {n: g.step for n, g in self.groups.items()}

    def weights(self) -> dict[str, float]:
        return {n: (0.0 if n in self.skip else g.weight) for n, g in self.groups.items()}

    def order_options(self, weighted: bool = True) -> dict[str, Any]:
        """Measured steps always; the time-per-MAC weights only when spending a latency
        budget: on MAC/param targets they moved the cut onto layers with few MACs and flat
        timings (vgg's hidden Linear 64 -> 7 channels, -40 points) for noise-level gains."""
        return {"steps": self.steps(), "weights": self.weights() if weighted else None}

    def summary(self) -> dict[str, Any]:
        counts: dict[int, int] = {}
        for s in self.steps().values():
            counts[s] = counts.get(s, 0) + 1
        return {
            "runtime": self.runtime, "batch": self.batch, "mode": self.mode,
            "steps": {str(k): v for k, v in sorted(counts.items())},
            "groups_left_uncut": sorted(self.skip),
            "seconds": round(self.seconds, 2), "ops_timed": self.ops_timed, "ops_cached": self.ops_cached,
            "per_group": {
                n: {"channels": g.channels, "step": g.step, "weight": round(g.weight, 3),
                    "times_us": {str(w): round(t, 2) for w, t in sorted(g.times_us.items())}}
                for n, g in self.groups.items()
            },
        }


def profile(
    model: nn.Module, example: torch.Tensor, groups: Sequence[ChannelGroup], batch: int = 1,
    threads: int | None = None, timer: OpTimer | None = None,
    progress: Callable[[float], None] | None = None,
) -> LatencyProfile:
    t0 = time.perf_counter()
    timer = timer or OpTimer(batch=batch, threads=threads)
    sigs = layer_sigs(model, example)
    out: dict[str, GroupProfile] = {}
    for gi, g in enumerate(groups):
        if progress:
            progress(gi / max(len(groups), 1))
        layers = _group_layers(model, g, sigs)
        c = g.channels
        big = _big_step(c)
        if not layers or big == 1:
            out[g.name] = GroupProfile(g.name, c, 1, {}, {})
            continue
        m = max(big, int(round(c / 2 / big)) * big)
        half = big // 2
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
        step = big
        if c > m:
            slope = (times[c] - times[m]) / (c - m)
            for s, probe in ((1, m + 1), (half, m + half)):
                if probe not in times or probe >= c:
                    continue
                line = times[m] + (probe - m) * slope
                if times[probe] <= line + NOISE_REL * times[m] + NOISE_ABS_US:
                    step = s
                    break
        out[g.name] = GroupProfile(g.name, c, step, times, macs)
    rates = [r for r in (g.time_per_mac for g in out.values()) if r is not None and r > 0]
    med = statistics.median(rates) if rates else 0.0
    for g in out.values():
        r = g.time_per_mac
        if med > 0 and r is not None:
            g.weight = float(min(WEIGHT_MAX, max(1.0 / WEIGHT_MAX, math.sqrt(r / med))))
    return LatencyProfile(
        runtime=timer.runtime, batch=batch, threads=threads, groups=out, seconds=time.perf_counter() - t0,
        ops_timed=timer.timed, ops_cached=timer.cached, timer=timer,
    )


def layer_latency(timer: OpTimer, before: dict[str, OpSig], after: dict[str, OpSig]) -> dict[str, tuple[float, float]]:
    """Per layer: measured one-op time (µs) at the original and at the pruned shape."""
    names = [n for n in before if n in after]
    ts = timer.times([before[n] for n in names] + [after[n] for n in names])
    k = len(names)
    return {n: (ts[i], ts[k + i]) for i, n in enumerate(names)}


# ------------------------------------------------------------------ whole-network timing


def batch_of(sample: np.ndarray, batch: int) -> np.ndarray:
    reps = int(math.ceil(batch / len(sample)))
    return np.concatenate([sample] * reps, axis=0)[:batch]


@dataclass
class NetworkTimer:
    """Times a torch module, exported to ONNX as the engine exports it, against the original."""

    base: bytes
    input_name: str
    sample: np.ndarray
    example: torch.Tensor
    opset: int
    threads: int | None = None
    runs: int = SEARCH_RUNS
    exports: int = 0

    def export(self, module: nn.Module) -> bytes:
        from workers.engine.export import export_onnx

        self.exports += 1
        return export_onnx(module, self.example, self.opset, input_name=self.input_name).SerializeToString()

    def ratio(self, module: nn.Module | bytes, batch: int) -> float:
        """Median of per-pair time ratios pruned/original over `runs` adjacent pairs, the
        order alternating (ABBA) so drift in machine load cancels."""
        pruned = module if isinstance(module, bytes) else self.export(module)
        base_sess = session(self.base, self.threads)
        pruned_sess = session(pruned, self.threads)
        x = batch_of(self.sample, batch)
        feed = {self.input_name: x}
        for _ in range(3):
            base_sess.run(None, feed)
            pruned_sess.run(None, feed)

        def timed(sess) -> float:
            t0 = time.perf_counter()
            sess.run(None, feed)
            return time.perf_counter() - t0

        ratios = []
        for i in range(self.runs):
            if i % 2:
                tb = timed(pruned_sess)
                ta = timed(base_sess)
            else:
                ta = timed(base_sess)
                tb = timed(pruned_sess)
            ratios.append(tb / ta)
        return float(statistics.median(ratios))

    def speedups(self, module: nn.Module, batches: Sequence[int]) -> dict[int, float]:
        pruned = self.export(module)
        return {b: 1.0 / self.ratio(pruned, b) for b in batches}

    def base_ms(self, batch: int) -> float:
        """Median latency of the original at `batch` (ms)."""
        sess = session(self.base, self.threads)
        feed = {self.input_name: batch_of(self.sample, batch)}
        for _ in range(3):
            sess.run(None, feed)
        times = []
        for _ in range(self.runs):
            t0 = time.perf_counter()
            sess.run(None, feed)
            times.append(time.perf_counter() - t0)
        return 1000.0 * float(statistics.median(times))


def search_latency(
    model: nn.Module, example: torch.Tensor, chunks: Sequence[Any], target: float, batch: int,
    timer: NetworkTimer, progress: Callable[[float], None] | None = None,
) -> tuple[nn.Module, dict[str, list[int]], dict[str, Any]]:
    """Binary search of the removal order's prefix whose *measured* latency (exported ONNX,
    onnxruntime, interleaved with the original) keeps `target` of the original's."""
    from workers.engine.budget import BudgetUnreachable, plan_of
    from workers.engine.graph import prune_copy

    cache: dict[int, tuple[list[float], nn.Module, bytes]] = {}
    trace: list[tuple[int, float]] = []

    def evaluate(n: int) -> float:
        if n not in cache:
            pruned = prune_copy(model, example, plan_of(chunks[:n]))
            onnx_bytes = timer.export(pruned)
            cache[n] = ([timer.ratio(onnx_bytes, batch)], pruned, onnx_bytes)
            trace.append((n, round(cache[n][0][0], 4)))
            if progress:
                progress(min(1.0, len(cache) / (math.log2(len(chunks) + 2) + 3)))
        return statistics.median(cache[n][0])

    lo, hi = 0, len(chunks)
    if evaluate(hi) > target:
        raise BudgetUnreachable(
            f"the target keeps {target:.1%} of the measured latency at batch {batch}, but removing every "
            f"channel that can be removed safely still keeps {evaluate(hi):.1%}; raise the target, or see "
            "the excluded layers for what cannot be pruned"
        )
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if evaluate(mid) <= target:
            hi = mid
        else:
            lo = mid
    # Measurements are noisy: both neighbours are timed twice more, and the one whose median
    # lands closest wins (verify then measures it once more, independently).
    finalists = [n for n in (lo, hi) if n in cache and n > 0]
    for n in finalists:
        for _ in range(2):
            cache[n][0].append(timer.ratio(cache[n][2], batch))
    best = min(finalists, key=lambda n: abs(evaluate(n) - target))
    details = {
        "allocation_metric": f"measured onnxruntime latency at batch {batch} (median of per-pair ratios)",
        "evaluations": sum(len(v[0]) for v in cache.values()),
        "latency_search": [{"chunks": n, "kept": r} for n, r in trace],
        "kept_latency_search": round(evaluate(best), 4),
    }
    return cache[best][1], plan_of(chunks[:best]), details


# ------------------------------------------------------------------ never slower


def slower(speedups: dict[int, float]) -> bool:
    return any(s < 1.0 for s in speedups.values())


def ensure_faster(
    lat: LatencyProfile, timer: NetworkTimer, rerun: Callable[[], Any], first: Any, module_of: Callable[[Any], nn.Module],
    batches: Sequence[int], notes: list[str], progress: Callable[[float, str | None], None] | None = None,
    meets_target: Callable[[Any], bool] = lambda _r: True,
    floor_ms: float = 0.0,
) -> tuple[Any, dict[str, Any]]:
    """Time the method's pruned model against the original at every reported batch size where
    the original runs at least `floor_ms` (below it dispatch and timer noise decide the ratio,
    as for the min_speedup gate); if it is slower, re-run the method's allocation with coarser
    widths, then with fewer cut groups, and keep the fastest that still meets the budget.
    Returns (result, details)."""
    batches = [b for b in batches if timer.base_ms(b) >= floor_ms]
    if not batches:
        return first, {"checks": [], "not_judged": f"the original runs under {floor_ms:g} ms at every batch size"}
    measured = timer.speedups(module_of(first), batches)
    history = [{"widths": lat.mode, "speedup": {str(b): round(s, 3) for b, s in measured.items()}}]
    best, best_speed, best_cfg = first, measured, (lat.mode, set(lat.skip))
    if not slower(measured):
        return first, {"checks": history}
    attempts: list[tuple[str, Callable[[], None]]] = [("coarse", lambda: setattr(lat, "mode", "coarse"))]

    def fewer_cuts() -> None:
        # Leave uncut the groups whose measured time falls least per MAC removed.
        lat.mode = "measured"
        ranked = sorted(lat.groups.values(), key=lambda g: g.weight)
        lat.skip = {g.name for g in ranked[: max(1, len(ranked) // 3)] if g.weight < 1.0}

    attempts.append(("fewer cut layers", fewer_cuts))
    for label, change in attempts:
        change()
        if progress:
            progress(0.9, f"pruned model measured slower; retrying with {label} widths")
        try:
            candidate = rerun()
        except Exception as exc:  # e.g. the budget is unreachable without those groups
            history.append({"widths": label, "error": str(exc).splitlines()[0][:200]})
            continue
        if not meets_target(candidate):
            history.append({"widths": label, "error": "misses the budget's tolerance"})
            continue
        speed = timer.speedups(module_of(candidate), batches)
        history.append({"widths": label, "speedup": {str(b): round(s, 3) for b, s in speed.items()}})
        if min(speed.values()) > min(best_speed.values()):
            best, best_speed, best_cfg = candidate, speed, (lat.mode, set(lat.skip))
        if not slower(speed):
            break
    lat.mode, lat.skip = best_cfg
    first_txt = ", ".join(f"batch {b} {s:.2f}x" for b, s in measured.items())
    best_txt = ", ".join(f"batch {b} {s:.2f}x" for b, s in best_speed.items())
    notes.append(
        f"never slower: the first allocation measured {first_txt} against the original; widths were "
        f"chosen again ({', '.join(h['widths'] for h in history[1:])}) and the fastest kept ({best_txt})"
    )
    return best, {"checks": history}


# ------------------------------------------------------------------ pipeline hooks


def attach(ctx: Any, base: bytes, input_name: str, sample: np.ndarray, threads: int | None,
           progress: Callable[[float, str | None], None] | None = None) -> None:
    """Give the prune context its latency profile (default widths) and network timer."""
    spec = ctx.spec
    auto = spec.export.round_to is None
    if not auto and spec.target.kind != "latency" and spec.gates.min_speedup is None:
        return
    ctx.latency_timer = NetworkTimer(base, input_name, sample, ctx.example.cpu(), spec.export.opset, threads)
    if auto and spec.target.kind != "layers":  # explicit per-layer ratios need no steps
        batch = spec.target.latency_batch if spec.target.kind == "latency" else 1
        if progress:
            progress(0.0, "timing each layer's kernels at candidate widths (onnxruntime)")
        ctx.latency = profile(
            ctx.model, ctx.example.cpu(), ctx.groups, batch=batch, threads=threads,
            progress=(lambda f: progress(0.1 * f, None)) if progress else None,
        )


def min_speedup_gate(spec: Any, latencies: Sequence[Any], notes: list[str] | None = None) -> Any | None:
    from prunery.report import GateResult

    limit = spec.gates.min_speedup
    if limit is None or not latencies:
        return None
    floor = spec.gates.min_speedup_floor_ms
    judged = [lat for lat in latencies if lat.before >= floor]
    skipped = [lat for lat in latencies if lat.before < floor]
    if skipped and notes is not None:
        notes.append(
            "min_speedup not judged at batch " + ", ".join(f"{lat.batch_size} ({lat.before:.3f} ms)" for lat in skipped)
            + f": the original runs under gates.min_speedup_floor_ms = {floor:g} ms there, where per-op "
            "dispatch and timer noise decide the ratio"
        )
    if not judged:
        return None
    worst = min(judged, key=lambda lat: lat.speedup)
    passed = worst.speedup >= limit * (1.0 - GATE_NOISE)
    message = (
        f"slowest at batch {worst.batch_size}: {worst.before:.3f} -> {worst.after:.3f} ms "
        f"({worst.speedup:.2f}x; passes at >= {limit * (1.0 - GATE_NOISE):.3f}x, {GATE_NOISE:.0%} noise allowed)"
    )
    if not passed:
        message += (
            "; the pruned model is slower than required even after re-choosing widths: try a smaller "
            "budget cut, export.round_to = 8 or 16, or disable the gate with gates.min_speedup = null"
        )
    return GateResult(name="min_speedup", limit=limit, value=worst.speedup, passed=passed, message=message)


def annotate_layers(rows: Sequence[Any], original: nn.Module, pruned: nn.Module, example: torch.Tensor,
                    timer: OpTimer | None, threads: int | None) -> str | None:
    """Fill each report row's one-op latency before -> after (µs, batch 1); returns how."""
    timer = timer if timer is not None and timer.batch == 1 else OpTimer(batch=1, threads=threads)
    try:
        before = layer_sigs(original, example.cpu())
        after = layer_sigs(pruned, example.cpu())
        times = layer_latency(timer, before, after)
    except Exception as exc:  # a layer kind the one-op graphs do not cover: say so, keep the rest
        return f"per-layer latency not measured ({type(exc).__name__}: {str(exc)[:120]})"
    for row in rows:
        if row.name in times:
            row.latency_before_us, row.latency_after_us = (round(v, 2) for v in times[row.name])
    return (
        f"per-layer latency: each layer alone as a one-op ONNX graph at batch 1 in {timer.runtime}, "
        f"median of {timer.runs} interleaved runs (cached per shape)"
    )


def metric_words(kind: str) -> str:
    return {"params": "parameters", "flops": "MACs", "latency": "measured latency"}.get(kind, "MACs")


def confirm_if_slow(spec: Any, before: Any, after: Any, notes: list[str], measure: Callable[[int], tuple[Any, Any]]) -> tuple[Any, Any]:
    """A verify measurement that would fail min_speedup is repeated once with 3x the runs
    (a loaded machine can make one series look slow); the longer series is reported."""
    limit = spec.gates.min_speedup
    if limit is None or not after.median_ms or before.median_ms / after.median_ms >= limit * (1.0 - GATE_NOISE):
        return before, after
    b2, a2 = measure(3 * before.runs)
    notes.append(
        f"batch {before.batch_size}: the first {before.runs} interleaved runs measured "
        f"{before.median_ms / after.median_ms:.3f}x, below min_speedup; measured again with {b2.runs} runs: "
        f"{b2.median_ms / a2.median_ms:.3f}x (reported)"
    )
    return b2, a2


def meets_budget(target: Any, costs: Any, base: Any) -> bool:
    """A MAC/parameter target within its tolerance (torch count); other targets: True."""
    if target.kind == "flops":
        return abs(costs.macs / base.macs - target.flops) <= target.tolerance
    if target.kind == "params":
        return abs(costs.params / base.params - target.params) <= target.tolerance
    return True
