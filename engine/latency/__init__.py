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
* **The runtime's blocked layout** (`ops.nchwc_layout`). onnxruntime's CPU convolutions
  work on NCHWc blocks of channels: 16 with AVX-512, 8 with AVX2, read from the runtime by
  letting it optimize two tiny graphs (no timing). A conv's output is padded to whole
  blocks; a pooling or residual add stays blocked only at a multiple of the block; a conv
  whose input width is off the alignment (4) runs onnxruntime's plain NCHW kernel, slower
  than the uncut blocked one. So a group's coarse step S is at least the block once the
  group spans two blocks, and no conv group's width leaves the alignment.
* **Per-group steps (the "fast set").** For each prunable group of width c, the group's
  layers (producers with w output channels, consumers with w input channels, depthwise
  layers with w of both) are timed at 4 widths: c, m (a multiple of the probe step P near
  c/2; P = S, or the GEMM panel of 8 for a conv group narrower than two blocks), m+1 and
  m+P/2. Time between m and c is close to linear in the width for a kernel without
  blocking; a width is "fast" when it costs no more than that line (plus noise). The
  group's step is the smallest of (1, P/2, P) whose probe width is fast, and at least the
  alignment: its widths are then multiples of that step. Cost: at most 4 one-op timings per
  layer and group. Uniform allocation rounds each group's cut to the nearest step.
* **Latency-aware allocation.** The same timings give each group's measured time saved per
  MAC removed; dividing the removal order's keys by its square root (normalised to the
  median group, clipped to [1/2, 2]) makes the budget go where it buys the most time.
* **Latency targets.** `target.latency = F` binary-searches the removal order's prefix
  against the *measured* latency of the really pruned network, exported to ONNX and timed
  alternately with the original (median of interleaved runs).
* **Whole-network width sets.** One-op timings cannot see everything: layout changes
  between layers, and on small feature maps the cost of a conv in whole *sets* of blocks
  (onnxruntime 1.32, AVX2, batch 32 at 8x8: a 3x3 conv with 40 channels in and out took
  2.1x the time of one with 32, for 1.6x the MACs; the zoo's vgg at half its MACs ran 1.44x
  faster than the original with widths 24/24/48/48 and 1.82x with 16/32/32/64). So when the
  method is cheap to re-run, the allocation is repeated with the coarse step S everywhere,
  exported and timed against the first in interleaved pairs, and kept only when faster
  head to head and not much less in agreement with the original (before recovery). The
  wide step 2S (conv groups at least 4S wide) halves some groups and leaves others whole,
  which cost accuracy, so it is a rescue only (below).
* **Never slower.** After pruning, the exported network is timed against the original at
  every reported batch size; if it is slower, the widths are chosen again — with the
  coarse, then the wide steps, then without the groups whose time hardly falls with
  width — and the fastest result is kept. The `gates.min_speedup` gate reports what remains.

The package: `ops` (one-op timings, the disk cache), `profiles` (per-group steps and
weights), `network` (whole-network timing, latency search, never slower), `hooks` (what the
pipeline calls).
"""

from engine.latency.hooks import (
    annotate_layers,
    attach,
    confirm_if_slow,
    confirm_latency_target,
    meets_budget,
    metric_words,
    min_speedup_gate,
    pairs_below,
)
from engine.latency.network import (
    NetworkTimer,
    batch_of,
    ensure_faster,
    search_latency,
    slower,
)
from engine.latency.ops import (
    GATE_NOISE,
    NOISE_ABS_US,
    NOISE_REL,
    RUNS,
    SEARCH_RUNS,
    SIGN_ALPHA,
    WARMUP,
    WEIGHT_MAX,
    OpSig,
    OpTimer,
    default_cache_path,
    layer_sigs,
    session,
    sign_test_p,
    significantly_below,
)
from engine.latency.profiles import (
    GroupProfile,
    LatencyProfile,
    layer_latency,
    profile,
)

__all__ = [
    "GATE_NOISE",
    "GroupProfile",
    "LatencyProfile",
    "NOISE_ABS_US",
    "NOISE_REL",
    "NetworkTimer",
    "OpSig",
    "OpTimer",
    "RUNS",
    "SEARCH_RUNS",
    "SIGN_ALPHA",
    "WARMUP",
    "WEIGHT_MAX",
    "annotate_layers",
    "attach",
    "batch_of",
    "confirm_if_slow",
    "confirm_latency_target",
    "default_cache_path",
    "ensure_faster",
    "layer_latency",
    "layer_sigs",
    "meets_budget",
    "metric_words",
    "min_speedup_gate",
    "pairs_below",
    "profile",
    "search_latency",
    "session",
    "sign_test_p",
    "significantly_below",
    "slower",
]
