"""Benchmark: the "Rethinking the Value of Network Pruning" methods, fine-tune vs scratch.

    .venv/bin/python -m benchmarks.methods [--models a,b] [--targets 0.5,0.25] [--epochs 1]
        [--methods random,l1_norm,...] [--recoveries finetune,scratch-E,scratch-B] [--runs 10]

For every zoo model (sklearn digits, opset 17) and MACs target it runs, with the *same*
recovery budget for all (`--epochs` epochs, Adam lr 1e-3, cosine, batch 64):

* random, l1_norm, network_slimming, thinet, channel_regression — each method's `run`
  through the engine's own stages (load, analyse, PruneContext, the method), then each
  recovery (`engine.stages.recover`) on a copy of the pruned network: fine-tune (E epochs), Scratch-E (re-initialise,
  E epochs) and Scratch-B (re-initialise, E x MACs_full/MACs_pruned epochs), then the
  pipeline's `export_and_verify` (parity check and onnxruntime measurements; shared with
  benchmarks/accuracy.py in benchmarks/common.py). The method runs once per
  (model, target) and its three recoveries share it, which is what makes the grid
  affordable; the numbers are the same ones `engine.run` reports.
  network_slimming additionally gets `sparsity_epochs = --epochs` of sparsity training
  before pruning (the paper trains with the L1 term from the start).
* tp magnitude — Torch-Pruning's BasePruner + MagnitudeImportance(p=1) used directly, as
  in benchmarks/engine.py (fine-tune only).

Prints one Markdown table (accuracy drop in points, achieved MACs on the exported ONNX,
onnxruntime speedup at batch 1 and 32, prune and total wall seconds), a summary of mean
drops per method/recovery/target over the models, and writes benchmarks/out/methods.md and
benchmarks/out/methods.png (mean accuracy vs achieved MACs per method). Never asserts.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from benchmarks.common import (
    RECOVERY,
    SEED,
    Baseline,
    fmt,
    grid_parser,
    grouped,
    machine,
    markdown,
    measure,
    over,
    parse_grid,
    recover_copy,
    run_grid,
    run_method,
    short_error,
    unknown_models,
)
from benchmarks.engine import bench_tp
from engine import train
from engine.stages import LATENCY_BATCHES
from prunery.spec import JobSpec
from tests.zoo import ZOO

METHODS = ("random", "l1_norm", "network_slimming", "thinet", "channel_regression")
RECOVERIES = ("finetune", "scratch-E", "scratch-B")


@dataclass
class Row:
    model: str
    target: float
    method: str
    recovery: str
    macs_kept: float | None = None
    speedup: dict[int, float] = field(default_factory=dict)
    acc_before: float | None = None
    acc_after: float | None = None
    acc_pruned: float | None = None  # before any recovery
    drop: float | None = None
    epochs: int | None = None
    prune_s: float | None = None
    wall: float | None = None
    note: str = ""


def spec_for(method: str, target: float, epochs: int, recovery: str = "finetune") -> JobSpec:
    params = {"sparsity_epochs": epochs} if method == "network_slimming" else {}
    mode, _, em = recovery.partition("-")
    return JobSpec(
        method={"name": method, "params": params},
        target={"flops": target},
        recovery={
            "mode": mode,
            "epochs": epochs,
            "epochs_mode": em or "E",
            "distill": {"enabled": False},  # the same plain recovery for every method
            **RECOVERY,
        },
        seed=SEED,
    )


def bench_method(
    name: str, base: Baseline, method: str, target: float, args: argparse.Namespace
) -> list[Row]:
    rows = [Row(name, target, method, r) for r in args.recoveries]
    t0 = time.perf_counter()
    try:
        pruned = run_method(base, spec_for(method, target, args.epochs))
    except Exception as exc:  # a failed method is a result too
        for r in rows:
            r.note, r.wall = short_error(exc), time.perf_counter() - t0
        return rows
    prune_s = time.perf_counter() - t0
    acc_pruned = train.accuracy(pruned.model, base.prep.data, device=torch.device("cpu"))
    for row in rows:
        t1 = time.perf_counter()
        spec = spec_for(method, target, args.epochs, row.recovery)
        try:
            recovered = recover_copy(base, pruned, spec)
            row.epochs = int(recovered.epochs)
            measure(
                row,
                base,
                recovered.model,
                batches=LATENCY_BATCHES,
                runs=args.runs,
                threads=args.ort_threads,
            )
        except Exception as exc:
            row.note = short_error(exc)
        row.prune_s, row.acc_pruned = prune_s, acc_pruned
        row.wall = prune_s + time.perf_counter() - t1
    return rows


def bench_peer(
    name: str, model_path: Path, data_path: Path, target: float, args: argparse.Namespace
) -> Row:
    ns = SimpleNamespace(
        target=target, epochs=args.epochs, runs=args.runs, ort_threads=args.ort_threads
    )
    r = bench_tp(name, model_path, data_path, ns)
    return Row(
        name,
        target,
        "tp magnitude",
        "finetune",
        macs_kept=r.macs_kept,
        speedup=r.speedup,
        acc_before=r.acc_before,
        acc_after=r.acc_after,
        drop=r.drop,
        epochs=args.epochs,
        wall=r.wall,
        note=r.note,
    )


# ------------------------------------------------------------------ output


def render(rows: list[Row]) -> str:
    return markdown(
        "| model | target | method | recovery | epochs | MACs kept | speedup b1 | speedup b32 | acc pruned | acc after "
        "| drop (pts) | prune s | wall s | note |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        rows,
        lambda r: (
            f"| {r.model} | {r.target} | {r.method} | {r.recovery} | {fmt(r.epochs, 'd')} | {fmt(r.macs_kept, '.3f')} "
            f"| {fmt(r.speedup.get(1), '.2f')} | {fmt(r.speedup.get(32), '.2f')} | {fmt(r.acc_pruned, '.3f')} "
            f"| {fmt(r.acc_after, '.4f')} | {fmt(r.drop, '.2f')} | {fmt(r.prune_s, '.1f')} | {fmt(r.wall, '.1f')} | {r.note} |"
        ),
    )


def summary(rows: list[Row]) -> str:
    """Mean over the models each method handled, per (target, method, recovery)."""
    lines = [
        "| target | method | recovery | models | mean drop (pts) | mean acc pruned | mean MACs kept | mean speedup b32 | mean wall s |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    key = lambda r: (r.target, r.method, r.recovery)  # noqa: E731
    by = grouped(rows, key, lambda r: r.drop is not None, lambda k: (-k[0], k[1], k[2]))
    for (t, m, rec), mine, done in by:
        mean = functools.partial(over, statistics.mean, done)
        lines.append(
            f"| {t} | {m} | {rec} | {len(done)}/{len(mine)} | {fmt(mean(lambda r: r.drop), '.2f')} "
            f"| {fmt(mean(lambda r: r.acc_pruned), '.3f')} | {fmt(mean(lambda r: r.macs_kept), '.3f')} "
            f"| {fmt(mean(lambda r: r.speedup.get(32)), '.2f')} | {fmt(mean(lambda r: r.wall), '.1f')} |"
        )
    return "\n".join(lines)


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recoveries = list(dict.fromkeys(r.recovery for r in rows))
    fig, axes = plt.subplots(
        1, len(recoveries), figsize=(5 * len(recoveries), 4), sharey=True, squeeze=False
    )
    for ax, rec in zip(axes[0], recoveries, strict=True):
        for method in dict.fromkeys(r.method for r in rows if r.recovery == rec):
            pts = []
            for t in sorted({r.target for r in rows}):
                done = [
                    r
                    for r in rows
                    if (r.method, r.recovery, r.target) == (method, rec, t)
                    and r.acc_after is not None
                ]
                if done:
                    pts.append(
                        (
                            statistics.mean(r.macs_kept for r in done),
                            statistics.mean(r.acc_after for r in done),
                        )
                    )
            if pts:
                xs, ys = zip(*sorted(pts), strict=True)
                ax.plot(xs, ys, marker="o", label=method)
        base = [r.acc_before for r in rows if r.acc_before is not None]
        if base:
            ax.axhline(statistics.mean(base), color="grey", linestyle="--", label="unpruned")
        ax.set_title(f"recovery: {rec}")
        ax.set_xlabel("MACs kept (ONNX, mean over models)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (mean over models)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    def own(p: argparse.ArgumentParser) -> None:
        p.add_argument("--methods", default=",".join(METHODS))
        p.add_argument("--recoveries", default=",".join(RECOVERIES))
        p.add_argument("--no-peer", action="store_true", help="skip the Torch-Pruning peer")
        p.add_argument("--runs", type=int, default=10, help="timed onnxruntime runs per latency")
        p.add_argument("--ort-threads", type=int, default=1, help="0: all cores")

    p = grid_parser(__doc__, 1, "recovery epochs E, the same for every method", own)
    args = parse_grid(p, argv)
    args.methods = args.methods.split(",")
    args.recoveries = args.recoveries.split(",")
    bad = unknown_models(args) + [r for r in args.recoveries if r not in RECOVERIES]
    if bad:
        p.error(f"unknown {bad}; models: {list(ZOO)}, recoveries: {list(RECOVERIES)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    def cells(
        name: str, model_path: Path, data_path: Path, base: Baseline, target: float
    ) -> Iterator[list[Row]]:
        for method in args.methods:
            rows = bench_method(name, base, method, target, args)
            print(
                f"  {name} {target} {method}: "
                + ", ".join(
                    f"{r.recovery} drop {fmt(r.drop, '.2f')}" + (f" ({r.note})" if r.note else "")
                    for r in rows
                ),
                file=sys.stderr,
                flush=True,
            )
            yield rows
        if not args.no_peer:
            yield [bench_peer(name, model_path, data_path, target, args)]

    rows = run_grid(
        args,
        f"{machine()}, targets {args.targets}, recovery {args.epochs} epoch(s), "
        f"{args.runs} latency runs",
        "methods.md",
        lambda rows: (render(rows), summary(rows)),
        lambda name, error: Row(name, 0.0, "(all)", "-", note=error),
        cells,
    )
    plot(rows, args.out / "methods.png")
    print(f"wrote {args.out / 'methods.md'} and {args.out / 'methods.png'}")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
