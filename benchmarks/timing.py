"""Benchmark: how repeatable are the engine's latency measurements, by onnxruntime threads?

    .venv/bin/python -m benchmarks.timing [--models mixer,vit] [--method channel_regression]
                                          [--target 0.25] [--repeats 3] [--threads 1,0]
                                          [--series 10]

Three tables, one per question (0 threads = onnxruntime's default, one per core):

* **A job's whole-network choice, run again.** For each model and thread count, the pipeline's
  prune stage (`engine.stages.prune`: measured widths, then the coarse set timed against the
  original and head to head) runs `--repeats` times on the same zoo model, method and MACs
  target. Each row gives the speedups (batch 1 / 32) it measured for both width sets and the
  set it kept. Nothing but the timing differs between repeats, so the spread is the
  measurement's.
* **One model against itself.** The original zoo model is timed against a second session of
  itself in `engine.export.interleaved_latency`'s ABBA order (`--pairs` pairs). The true ratio
  is 1; the medians of the even pairs (A first) and the odd pairs (B first) show whether one
  session's thread pool, still spinning, slows the other's next run.
* **Disturbed series.** `--series` raw interleaved series of the model against itself at
  batch 1 (no re-measuring), each with its median and 10th percentile per session: a series
  whose median stands over `export.DISTURBED` x its 10th percentile is one the engine
  measures again (`export.interleaved_latency`, at most `export.MAX_SERIES` series).

Prints Markdown; never asserts. The zoo models come from the zoo cache (trained once).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from benchmarks.accuracy import config, spec_for
from benchmarks.common import SEED, Baseline, machine, prepare_model, zoo_models
from engine import export as export_mod
from engine.stages import prune
from methods import registry


def _speedups(check: dict) -> str:
    s = check.get("speedup")
    return "/".join(f"{v:.2f}" for v in s.values()) + "x" if s else "failed"


WHOLE_NETWORK = [
    "| model | onnxruntime threads | repeat | measured widths b1/b32 | coarse widths b1/b32 "
    "| coarse head to head | kept |",
    "|---|---|---:|---|---|---|---|",
]
AGAINST_ITSELF = [
    "| model | onnxruntime threads | batch | ms (A) | median ratio B/A | even pairs (A first) "
    "| odd pairs (B first) |",
    "|---|---|---:|---:|---:|---:|---:|",
]


def whole_network(args: argparse.Namespace, name: str, base: Baseline) -> list[str]:
    """The prune stage `--repeats` times per thread count: both width sets' speedups."""
    lines = []
    spec = spec_for(config(args.method, 3), args.target, 3)
    for threads in args.threads:
        for r in range(args.repeats):
            torch.manual_seed(SEED)
            prep = base.prep.rebind(spec, registry)
            checks = prune(prep, lambda _f, _m: None, latency_threads=threads).speed_checks
            rows = {c["widths"]: c for c in checks.get("checks", [])}
            measured, coarse = rows.get("measured", {}), rows.get("coarse", {})
            h2h = coarse.get("vs_kept")
            lines.append(
                f"| {name} | {export_mod.threads_label(threads)} | {r + 1} "
                f"| {_speedups(measured) if measured else '-'} "
                f"| {_speedups(coarse) if coarse else '-'} "
                f"| {'/'.join(f'{v:.2f}' for v in h2h.values()) + 'x' if h2h else '-'} "
                f"| {checks.get('kept', 'first')} |"
            )
            print(lines[-1], file=sys.stderr, flush=True)
    return lines


def against_itself(args: argparse.Namespace, name: str, model: bytes, base: Baseline) -> list[str]:
    """The original against a second session of itself, per thread count and batch size."""
    lines = []
    input_name = base.prep.loaded.model.input_name
    sample = base.prep.data.x_test[:32].numpy()
    for threads in args.threads:
        for bs in (1, 32):
            a, b = export_mod.interleaved_latency(
                model, model, input_name, input_name, sample, bs, runs=args.pairs, threads=threads
            )
            ratios = [tb / ta for ta, tb in zip(a.times_ms, b.times_ms, strict=True) if ta > 0]
            lines.append(
                f"| {name} | {export_mod.threads_label(threads)} | {bs} | {a.median_ms:.4f} "
                f"| {statistics.median(ratios):.2f} | {statistics.median(ratios[0::2]):.2f} "
                f"| {statistics.median(ratios[1::2]):.2f} |"
            )
            print(lines[-1], file=sys.stderr, flush=True)
    return lines


DISTURBED_SERIES = [
    "| model | series | A median / p10 (us) | B median / p10 (us) | spread | measured again |",
    "|---|---:|---|---|---:|---|",
]


def disturbed_series(
    args: argparse.Namespace, name: str, model: bytes, base: Baseline
) -> list[str]:
    """Raw series at batch 1 (MAX_SERIES forced to 1): which ones the engine would redo."""
    lines = []
    input_name = base.prep.loaded.model.input_name
    sample = base.prep.data.x_test[:32].numpy()
    keep = export_mod.MAX_SERIES
    export_mod.MAX_SERIES = 1
    try:
        for i in range(args.series):
            a, b = export_mod.interleaved_latency(
                model, model, input_name, input_name, sample, 1, runs=30, threads=1
            )
            cols = []
            for lat in (a, b):
                srt = sorted(lat.times_ms)
                cols.append(
                    f"{1000 * lat.median_ms:.1f} / {1000 * srt[int(0.1 * (len(srt) - 1))]:.1f}"
                )
            lines.append(
                f"| {name} | {i + 1} | {cols[0]} | {cols[1]} | {a.disturbance:.2f} "
                f"| {'yes' if a.disturbance > export_mod.DISTURBED else 'no'} |"
            )
            print(lines[-1], file=sys.stderr, flush=True)
    finally:
        export_mod.MAX_SERIES = keep
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="mixer,vit")
    p.add_argument("--method", default="channel_regression")
    p.add_argument("--target", type=float, default=0.25, help="MACs fraction to keep")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--pairs", type=int, default=200, help="pairs of the self-timing")
    p.add_argument(
        "--threads", default="1,0", help="onnxruntime intra-op threads to compare (0: all cores)"
    )
    p.add_argument("--torch-threads", type=int, default=2)
    p.add_argument(
        "--series", type=int, default=10, help="raw batch-1 series of the disturbed-series table"
    )
    args = p.parse_args(argv)
    args.models = args.models.split(",")
    args.threads = [int(t) for t in args.threads.split(",")]
    torch.set_num_threads(args.torch_threads)
    t0 = time.perf_counter()
    print(" ".join(sys.argv))
    print(f"{machine()}, torch threads {args.torch_threads}, {args.method} at {args.target} MACs\n")
    networks, itself = list(WHOLE_NETWORK), list(AGAINST_ITSELF)
    disturbed = list(DISTURBED_SERIES)
    for name, model_path, data_path in zoo_models(args.models):
        base = prepare_model(model_path, data_path)  # load and analyse once per model
        disturbed += disturbed_series(args, name, model_path.read_bytes(), base)
        if args.repeats:
            networks += whole_network(args, name, base)
        itself += against_itself(args, name, model_path.read_bytes(), base)
    print("\n".join(networks))
    print()
    print("\n".join(itself))
    print()
    print("\n".join(disturbed))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
