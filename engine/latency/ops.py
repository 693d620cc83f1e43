"""Op timings: each Conv/Linear layer as a one-node ONNX graph timed in onnxruntime
(cached on disk per op shape, runtime, provider, CPU, threads and batch)."""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from engine.export import SETTLE_S, timing_threads
from prunery.types import prunery_home

RUNS = 15  # timed runs per op and width (interleaved), after WARMUP
WARMUP = 3
SEARCH_RUNS = 20  # interleaved whole-network runs per latency-search evaluation
NOISE_REL, NOISE_ABS_US = 0.04, 2.0  # what counts as "no slower than the line"
# Latency-aware allocation: a group's keys are divided by sqrt(its measured time saved per
# MAC / the median group's), clipped to [1/WEIGHT_MAX, WEIGHT_MAX] — a nudge, not a takeover:
# one-op timings of small layers are noisy, and very uneven cuts cost accuracy.
WEIGHT_MAX = 2.0
GATE_NOISE = 0.03  # min_speedup allows this much measurement noise (stated in the gate)
# "Slower" is decided by a one-sided sign test over interleaved pairs (pruned vs original run
# back to back): at most this chance that a model no slower than the line shows as many slow
# pairs. Unlike an absolute floor in ms, it judges sub-millisecond models too, and it does not
# fail a model that is as fast as the original but timed on a noisy machine.
SIGN_ALPHA = 0.05


def sign_test_p(n: int, k: int) -> float:
    """P(at least k of n fair coin flips land one way)."""
    return sum(math.comb(n, i) for i in range(k, n + 1)) / (1 << n) if n else 1.0


def significantly_below(values: Sequence[float], line: float) -> bool:
    """Do more of the paired `values` fall below `line` than chance allows (sign test)?"""
    k = sum(v < line for v in values)
    return bool(values) and sign_test_p(len(values), k) <= SIGN_ALPHA


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

    @property
    def blocked(self) -> bool:
        """A grouped conv that loses whole blocks (grouped.takes_blocks): in and out channels
        go together, the per-group width stays."""
        return self.kind == "conv" and 1 < self.groups < self.cin and self.cin == self.cout

    def key(self, batch: int) -> str:
        return (
            f"{self.kind}|b{batch}|{self.cin}x{self.cout}|s{self.spatial}|k{self.kernel}|st{self.stride}"
            f"|p{self.pads}|d{self.dilation}|g{self.groups}"
        )

    def macs(self) -> int:
        if self.kind == "matmul":
            return int(np.prod(self.spatial or (1,))) * self.cin * self.cout
        out_sp = [
            (
                s
                + self.pads[i]
                + self.pads[i + len(self.spatial)]
                - self.dilation[i] * (self.kernel[i] - 1)
                - 1
            )
            // self.stride[i]
            + 1
            for i, s in enumerate(self.spatial)
        ]
        return (
            int(np.prod(out_sp)) * self.cout * (self.cin // self.groups) * int(np.prod(self.kernel))
        )

    def resized(self, cin: int, cout: int) -> OpSig:
        groups = self.groups
        if self.depthwise:
            cin = cout = groups = max(cin, cout)
        elif self.blocked:  # whole blocks: keep the per-group width, fewer groups
            per = self.cin // self.groups
            cin = cout = max(per, round(max(cin, cout) / per) * per)
            groups = cin // per
        elif groups > 1:  # grouped: keep the group count, widths multiples of it
            cin = max(groups, cin // groups * groups)
            cout = max(groups, cout // groups * groups)
        return OpSig(
            self.kind,
            cin,
            cout,
            self.spatial,
            self.kernel,
            self.stride,
            self.pads,
            self.dilation,
            groups,
        )


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
                sigs[name] = OpSig(
                    "matmul",
                    mod.in_features,
                    mod.out_features,
                    tuple(int(d) for d in x.shape[1:-1]),
                )
                return
            assert isinstance(mod, (nn.Conv1d, nn.Conv2d))  # the only modules hooked besides Linear
            n = x.dim() - 2
            padding = mod.padding
            if isinstance(padding, str):  # 'same' / 'valid'
                k = _tuple(mod.kernel_size, n)
                pads = tuple((kk - 1) // 2 for kk in k) * 2 if padding == "same" else (0,) * (2 * n)
            else:
                p = _tuple(padding, n)
                pads = p + p
            sigs[name] = OpSig(
                "conv",
                mod.in_channels,
                mod.out_channels,
                tuple(int(d) for d in x.shape[2:]),
                _tuple(mod.kernel_size, n),
                _tuple(mod.stride, n),
                pads,
                _tuple(mod.dilation, n),
                int(mod.groups),
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
        w = numpy_helper.from_array(
            rng.standard_normal((sig.cin, sig.cout)).astype(np.float32), "w"
        )
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
    else:
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, sig.cin, *sig.spatial])
        w = numpy_helper.from_array(
            rng.standard_normal((sig.cout, sig.cin // sig.groups, *sig.kernel)).astype(np.float32),
            "w",
        )
        node = helper.make_node(
            "Conv",
            ["x", "w"],
            ["y"],
            pads=list(sig.pads),
            strides=list(sig.stride),
            dilations=list(sig.dilation),
            group=sig.groups,
        )
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    model = helper.make_model(
        helper.make_graph([node], "op", [x], [y], [w]), opset_imports=[helper.make_opsetid("", 17)]
    )
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
    return prunery_home() / "cache" / "latency.json"


def session(model: bytes, threads: int | None, provider: str = "CPUExecutionProvider"):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    threads = timing_threads(threads)
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(model, opts, providers=[provider])


NCHWC_DOMAIN = "com.microsoft.nchwc"


class NchwcLayout(NamedTuple):
    """onnxruntime's blocked (NCHWc) CPU layout on this machine, read from the runtime.

    * `block`: channels per block (16 with AVX-512, 8 with AVX2; 1: no such layout). A conv's
      output channels are padded up to whole blocks, and a pooling stays in the blocked
      layout only when its channels are a multiple of the block (else the graph reorders to
      plain NCHW around it). On AVX-512 a 24-channel conv costs what a 32-channel one does,
      and vgg's max-pool after it ran 4x slower (8 -> 34 µs at batch 32).
    * `align`: a conv whose *input* channels are not a multiple of it is not blocked at
      all: it runs onnxruntime's plain NCHW kernel, about 1.4x slower than the blocked one
      at the full width (resnet_basic, a 22-channel stage: 441 µs against 313 µs for 32)."""

    block: int
    align: int


def _optimized_ops(graph: Any, provider: str, tmp: Path) -> list[tuple[str, str]]:
    import onnxruntime as ort

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    path = tmp / f"{graph.name}.onnx"
    opts.optimized_model_filepath = str(path)
    ort.InferenceSession(model.SerializeToString(), opts, providers=[provider])
    return [(n.op_type, n.domain) for n in onnx.load(str(path)).graph.node]


def _conv_pair(cin: int, width: int, tail: str) -> Any:
    """Conv(cin -> width) followed by MaxPool ("pool") or by Relu and Conv(width -> cin)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    inits = [numpy_helper.from_array(np.ones((width, cin, 3, 3), np.float32), "w1")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1])]
    if tail == "pool":
        nodes.append(helper.make_node("MaxPool", ["h"], ["y"], kernel_shape=[2, 2], strides=[2, 2]))
    else:
        inits.append(numpy_helper.from_array(np.ones((cin, width, 3, 3), np.float32), "w2"))
        nodes += [
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1, 1, 1, 1]),
        ]
    return helper.make_graph(nodes, f"nchwc_{tail}_{cin}_{width}", [x], [y], inits)


@functools.lru_cache(maxsize=8)
def nchwc_layout(provider: str = "CPUExecutionProvider") -> NchwcLayout:
    """Let onnxruntime optimize tiny Conv -> MaxPool and Conv -> Conv graphs and read which
    nodes it moved into the NCHWc domain: the smallest pooled width that stays blocked is the
    block; the smallest step above the block at which the second conv stays blocked is the
    alignment. (1, 1) for other providers and CPUs without the layout."""
    if provider != "CPUExecutionProvider":
        return NchwcLayout(1, 1)
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        try:
            block = next(
                (
                    c
                    for c in (4, 8, 16, 32, 64)
                    if ("MaxPool", NCHWC_DOMAIN)
                    in _optimized_ops(_conv_pair(c, c, "pool"), provider, tmp)
                ),
                1,
            )
            if block == 1:
                return NchwcLayout(1, 1)
            align = next(
                (
                    a
                    for a in (1, 2, 4, 8, 16, 32)
                    if a < block
                    and _optimized_ops(
                        _conv_pair(2 * block, block + a, "conv"), provider, tmp
                    ).count(("Conv", NCHWC_DOMAIN))
                    == 2
                ),
                block,
            )
        except Exception:  # noqa: BLE001 - an optimizer that writes nothing: no known layout
            return NchwcLayout(1, 1)
    return NchwcLayout(block, align)


class OpTimer:
    """Median onnxruntime time (µs) of one-op graphs, cached on disk."""

    def __init__(
        self,
        batch: int = 1,
        threads: int | None = None,
        provider: str = "CPUExecutionProvider",
        cache_path: Path | None = None,
        runs: int = RUNS,
    ) -> None:
        import onnxruntime as ort

        # `threads` as asked (None: the default, 0: all cores); `session` resolves it. Resolving
        # it here too would turn 0 -> None into the one-thread default there.
        self.batch, self.threads, self.provider, self.runs = batch, threads, provider, runs
        self.runtime = f"onnxruntime {ort.__version__} {provider} | {_cpu_name()} | threads {timing_threads(threads) or 'default'}"
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
            fd, tmp = tempfile.mkstemp(
                prefix=".latency.", suffix=".tmp", dir=self.cache_path.parent
            )
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
        if items:
            time.sleep(SETTLE_S)  # let torch's OpenMP workers stop spinning (engine.export)
        for i in range(0, len(items), 8):  # a few sessions at a time, timed in alternation
            self._measure(items[i : i + 8])
        if todo:
            self._save()
        return [self._cache[k] for k in keys]

    def paired_times(self, pairs: Sequence[tuple[OpSig, OpSig]]) -> list[tuple[float, float]]:
        """Each (before, after) pair measured now, its two sessions in the same interleaved
        series (whatever the cache holds; a shape in two pairs is timed in both): values of
        one shape measured minutes apart, in series with other shapes, moved by 2x for ops of
        20-50 us (a 288 -> 192 channel 1x1 conv at 4x4 read 21 us cached before and 46 us
        after, 48 / 41 us timed together)."""
        out: list[tuple[float, float]] = []
        if pairs:
            time.sleep(SETTLE_S)
        for i in range(0, len(pairs), 4):  # 4 pairs: at most 8 sessions in alternation
            chunk = pairs[i : i + 4]
            items: list[tuple[str, OpSig]] = []
            where: list[tuple[int, int]] = []
            for a, b in chunk:
                ka, kb = a.key(self.batch), b.key(self.batch)
                ia = len(items)
                items.append((ka, a))
                if kb != ka:  # an unchanged layer: one session, one number
                    items.append((kb, b))
                where.append((ia, len(items) - 1))
            medians = self._measure(items)
            out.extend((medians[ia], medians[ib]) for ia, ib in where)
        if pairs:
            self._save()
        return out

    def _measure(self, items: list[tuple[str, OpSig]]) -> list[float]:
        rng = np.random.default_rng(0)
        runs: list[tuple[Any, np.ndarray, list[float]]] = []
        for _key, sig in items:
            shape = (
                [self.batch, *sig.spatial, sig.cin]
                if sig.kind == "matmul"
                else [self.batch, sig.cin, *sig.spatial]
            )
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
        medians = [float(statistics.median(ts)) for _s, _x, ts in runs]
        for (key, _sig), m in zip(items, medians, strict=True):
            self._cache[key] = m
        self.timed += len(items)
        return medians
