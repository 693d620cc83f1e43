"""Benchmark: Prunery's engine against Torch-Pruning used directly, over the test model zoo.

    .venv/bin/python -m benchmarks.engine [--models a,b] [--epochs 3] [--target 0.5] [--runs 30]
                                          [--round-to 8] [--ort-threads 1] [--cache-dir DIR]

For every zoo model (sklearn digits, exported at opset 17) it runs

* prunery:  `engine.pipeline.run` with l1_norm and target {"flops": T}; every number
            comes from the engine's own report;
* tp:       the same converted torch module (`engine.load.load`), pruned by
            Torch-Pruning's BasePruner + MagnitudeImportance(p=1) with one uniform
            `pruning_ratio` (binary-searched so the MACs keep ~T), the classifier ignored,
            then the same fine-tune, export and onnxruntime measurements as the engine.

and prints one Markdown table. A benchmark, not a test: failures become table cells.
About a minute on 2 idle cores with a warm zoo cache; training the zoo (a cold cache, or
after tests/zoo.py changes) adds a few minutes. Latencies are noisy on a shared machine:
`--ort-threads 1 --runs 100` gives steadier ratios.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import onnx
import torch
import torch_pruning as tp
from torch import nn

from benchmarks.common import (
    command_line,
    fmt,
    grouped,
    markdown,
    over,
    quiet,
    short_error,
    unknown_models,
    zoo_parser,
)
from core.validation import datasets
from engine import export as export_mod
from engine import load as load_mod
from engine import train as train_mod
from engine.flops import onnx_costs, torch_costs
from engine.pipeline import LATENCY_BATCHES, dynamic_batch, run
from methods import registry
from prunery.report import Report
from prunery.spec import JobSpec
from tests.zoo import ZOO, build_zoo_model, default_cache_dir, write_digits_npz

ROOT = Path(__file__).resolve().parents[1]

STAGES = ("load", "analyse", "prune", "recover", "export", "verify")
SEED = 0
# Recovery settings shared by both sides: the engine's Recovery defaults, stated explicitly
# so the peer cannot drift from them.
LR, BATCH, OPTIMIZER, SCHEDULE = 1e-3, 64, "adam", "cosine"
SEARCH_STEPS, SEARCH_TOL = 14, 0.005


@dataclass
class Row:
    model: str
    method: str
    macs_kept: float | None = None
    speedup: dict[int, float] = field(default_factory=dict)
    acc_before: float | None = None
    acc_after: float | None = None
    drop: float | None = None  # percentage points
    stages: dict[str, float] = field(default_factory=dict)
    wall: float | None = None
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.macs_kept is not None


# ------------------------------------------------------------------ prunery


def bench_prunery(
    name: str, model_path: Path, data_path: Path, args: argparse.Namespace, round_to: int = 1
) -> Row:
    label = "prunery l1_norm" + (f" r{round_to}" if round_to > 1 else "")
    row = Row(name, label)
    spec = JobSpec(
        method={"name": "l1_norm"},
        target={"flops": args.target},
        recovery={
            "epochs": args.epochs,
            "lr": LR,
            "batch_size": BATCH,
            "optimizer": OPTIMIZER,
            "schedule": SCHEDULE,
        },
        export={"opset": 17, "round_to": round_to},
        seed=SEED,
    )
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as out:
            report: Report = run(
                spec,
                model_path,
                data_path,
                out,
                latency_runs=args.runs,
                latency_threads=args.ort_threads,
                catalog=registry,
            )
    except Exception as exc:  # a failed job is a result too: show it, keep benchmarking
        row.wall, row.note = time.perf_counter() - t0, short_error(exc)
        return row
    row.wall = time.perf_counter() - t0
    row.macs_kept = report.macs.ratio
    row.speedup = {lat.batch_size: lat.speedup for lat in report.latency_ms}
    if report.accuracy is not None:  # always there for classification
        row.acc_before, row.acc_after, row.drop = (
            report.accuracy.before,
            report.accuracy.after,
            report.accuracy.drop,
        )
    row.stages = {s: report.stage_seconds.get(s, 0.0) for s in STAGES}
    if not report.target.met:
        row.note = f"target missed ({report.target.achieved:.3f})"
    return row


# ------------------------------------------------------------------ torch-pruning peer


def _classifier_names(module: nn.Module, num_classes: int) -> list[str]:
    """Linear layers producing the logits: pruning them would drop classes."""
    return [
        n
        for n, m in module.named_modules()
        if isinstance(m, nn.Linear) and m.out_features == num_classes
    ]


def tp_prune(
    module: nn.Module, example: torch.Tensor, ratio: float, keep: list[str], round_to: int = 1
) -> nn.Module:
    """A pruned copy: uniform per-layer `ratio` of channels removed by L1 magnitude."""
    pruned = copy.deepcopy(module)
    ignored = [pruned.get_submodule(n) for n in keep]  # the copy's modules, not the original's
    pruner = tp.pruner.BasePruner(
        pruned,
        example,
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=ratio,
        ignored_layers=ignored,
        global_pruning=False,
        round_to=round_to if round_to > 1 else None,
    )
    with torch.enable_grad():  # tp traces the graph through autograd
        pruner.step()
    return pruned.eval()


def search_ratio(
    module: nn.Module, example: torch.Tensor, target: float, keep: list[str], round_to: int = 1
) -> tuple[nn.Module, float]:
    """Bisect tp's pruning_ratio so the torch-counted MACs keep ~target of the original.

    The engine's budget search also counts with `torch_costs`, so both sides aim with the
    same ruler; the table then reports MACs measured on the exported ONNX graphs.
    """
    base = torch_costs(module, example).macs
    lo, hi = 0.0, 0.95
    best: tuple[float, nn.Module, float] | None = None  # (|error|, model, kept)
    for _ in range(SEARCH_STEPS):
        mid = (lo + hi) / 2
        candidate = tp_prune(module, example, mid, keep, round_to)
        kept = torch_costs(candidate, example).macs / base
        if best is None or abs(kept - target) < best[0]:
            best = (abs(kept - target), candidate, kept)
        if abs(kept - target) <= SEARCH_TOL:
            break
        lo, hi = (mid, hi) if kept > target else (lo, mid)
    assert best is not None
    return best[1], best[2]


def bench_tp(
    name: str, model_path: Path, data_path: Path, args: argparse.Namespace, round_to: int = 1
) -> Row:
    row = Row(name, "tp magnitude" + (f" r{round_to}" if round_to > 1 else ""))
    t0 = time.perf_counter()
    try:
        _measure_tp(row, model_path, data_path, args, round_to)
    except Exception as exc:  # e.g. tp's index mapping through onnx2torch Reshape/Transpose
        row.note = "tp failed: " + short_error(exc)
        row.macs_kept = None
    row.wall = time.perf_counter() - t0
    return row


def tp_search(
    model_path: Path, data_path: Path, target: float, round_to: int = 1
) -> tuple[load_mod.LoadedModel, train_mod.TensorData, torch.Tensor, nn.Module]:
    """The peer's prune: the model loaded as the pipeline loads it (same data, same split,
    same example), then `search_ratio` to `target` with the classifier kept. Returns the
    loaded model, the data, the example and the pruned module."""
    ds = datasets.load_dataset(data_path, seed=SEED)
    data = train_mod.TensorData.from_numpy(ds)
    loaded = load_mod.load(model_path, ds.sample_shape, seed=SEED)
    example = data.x_train[:1].clone()
    with torch.no_grad():
        num_classes = int(loaded.module(example).shape[1])
    keep = _classifier_names(loaded.module, num_classes)
    pruned, _ = search_ratio(loaded.module, example, target, keep, round_to)
    return loaded, data, example, pruned


def _measure_tp(
    row: Row, model_path: Path, data_path: Path, args: argparse.Namespace, round_to: int
) -> None:
    loaded, data, example, pruned = tp_search(model_path, data_path, args.target, round_to)
    with torch.no_grad():
        pruned(data.x_test[:4])  # tp may step fine yet leave a graph that no longer runs
    train_mod.train(
        pruned,
        data,
        epochs=args.epochs,
        lr=LR,
        batch_size=BATCH,
        optimizer=OPTIMIZER,
        schedule=SCHEDULE,
        seed=SEED,
        device=torch.device("cpu"),
    )
    pruned_onnx = export_mod.export_onnx(
        pruned.cpu().eval(), example, 17, input_name=loaded.input_name
    )
    # The pipeline's own baseline: the normalised upload with a symbolic batch.
    base_onnx = dynamic_batch(loaded.onnx_model)
    _measure_onnx(row, base_onnx, pruned_onnx, loaded.input_name, data, args.runs, args.ort_threads)


def _measure_onnx(
    row: Row,
    base: onnx.ModelProto,
    pruned: onnx.ModelProto,
    input_name: str,
    data: train_mod.TensorData,
    runs: int,
    threads: int | None,
) -> None:
    """The pipeline's verify stage, numbers only."""
    x, y = data.x_test.numpy(), data.y_test.numpy()
    feed1 = {input_name: x[:1]}
    row.macs_kept = onnx_costs(pruned, feed1).macs / onnx_costs(base, feed1).macs
    base_b, pruned_b = base.SerializeToString(), pruned.SerializeToString()
    row.acc_before = export_mod.topk_accuracy(export_mod.onnx_predict(base_b, input_name, x), y, 1)
    row.acc_after = export_mod.topk_accuracy(export_mod.onnx_predict(pruned_b, input_name, x), y, 1)
    row.drop = round((row.acc_before - row.acc_after) * 100.0, 4)
    for bs in LATENCY_BATCHES:
        before, after = export_mod.interleaved_latency(
            base_b, pruned_b, input_name, input_name, x[:bs], bs, runs=runs, threads=threads
        )
        row.speedup[bs] = before.median_ms / after.median_ms


# ------------------------------------------------------------------ table


def _stage_cell(row: Row) -> str:
    return " ".join(f"{s[0]}{row.stages[s]:.1f}" for s in STAGES) if row.stages else ""


def render(rows: list[Row]) -> str:
    return markdown(
        "| model | method | MACs kept | speedup b1 | speedup b32 | acc before | acc after | drop (pts) "
        "| stage s (l a p r e v) | wall s | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|",
        rows,
        lambda r: (
            f"| {r.model} | {r.method} | {fmt(r.macs_kept, '.3f')} | {fmt(r.speedup.get(1), '.2f')} "
            f"| {fmt(r.speedup.get(32), '.2f')} | {fmt(r.acc_before, '.4f')} | {fmt(r.acc_after, '.4f')} "
            f"| {fmt(r.drop, '.2f')} | {_stage_cell(r)} | {fmt(r.wall, '.1f')} | {r.note} |"
        ),
    )


def medians(rows: list[Row]) -> str:
    """One line per method over the models it handled (failures are counted, not averaged)."""
    lines = []
    for method, mine, done in grouped(rows, lambda r: r.method, lambda r: r.ok):
        med = functools.partial(over, statistics.median, done)
        lines.append(
            f"median {method} over {len(done)}/{len(mine)} models: MACs kept {fmt(med(lambda r: r.macs_kept), '.3f')}, "
            f"speedup b1 {fmt(med(lambda r: r.speedup.get(1)), '.2f')}, b32 {fmt(med(lambda r: r.speedup.get(32)), '.2f')}, "
            f"drop {fmt(med(lambda r: r.drop), '.2f')} pts, wall {fmt(med(lambda r: r.wall), '.1f')} s"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = zoo_parser(__doc__)
    p.add_argument("--epochs", type=int, default=3, help="recovery fine-tune epochs, both sides")
    p.add_argument(
        "--target", type=float, default=0.5, help="fraction of the original MACs to keep"
    )
    p.add_argument("--runs", type=int, default=30, help="timed onnxruntime runs per latency")
    p.add_argument(
        "--round-to",
        type=int,
        default=1,
        help="if > 1, add rows with widths rounded to multiples of N",
    )
    p.add_argument(
        "--ort-threads",
        type=int,
        default=1,
        help="onnxruntime intra-op threads for latency (default 1, as the engine times; "
        "0: onnxruntime's default, all cores)",
    )
    p.add_argument("--cache-dir", type=Path, default=None, help="zoo cache (default: tests' cache)")
    args = p.parse_args(argv)
    if unknown := unknown_models(args):
        p.error(f"unknown models {unknown}; the zoo has {list(ZOO)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    quiet()
    print(command_line())
    print(
        f"torch {torch.__version__}, onnxruntime {version('onnxruntime')}, torch-pruning {version('torch-pruning')}, "
        f"torch threads {torch.get_num_threads()}, onnxruntime threads {args.ort_threads or 'default (all cores)'}, "
        f"{os.cpu_count()} cpus; "
        f"target flops {args.target}, recovery {args.epochs} epochs, {args.runs} latency runs"
    )
    cache = args.cache_dir or default_cache_dir()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        data_path = write_digits_npz(Path(tmp) / "digits.npz")
        for name in args.models.split(","):
            model_path, _ = build_zoo_model(name, cache, opset=17)
            rows.append(bench_prunery(name, model_path, data_path, args))
            if args.round_to > 1:  # widths that fit onnxruntime's blocked (NCHWc) conv kernels
                rows.append(
                    bench_prunery(name, model_path, data_path, args, round_to=args.round_to)
                )
            rows.append(bench_tp(name, model_path, data_path, args))
            if args.round_to > 1:  # the peer gets the same rounding, for a like-for-like row
                rows.append(bench_tp(name, model_path, data_path, args, round_to=args.round_to))
            print(f"  done {name}", file=sys.stderr, flush=True)
    print()
    print(render(rows))
    print()
    print(medians(rows))


if __name__ == "__main__":
    main()
