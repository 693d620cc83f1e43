"""Benchmark: the "Rethinking the Value of Network Pruning" methods, fine-tune vs scratch.

    .venv/bin/python benchmarks/methods.py [--models a,b] [--targets 0.5,0.25] [--epochs 1]
        [--methods random,l1_norm,...] [--recoveries finetune,scratch-E,scratch-B] [--runs 10]

For every zoo model (sklearn digits, opset 17) and MACs target it runs, with the *same*
recovery budget for all (`--epochs` epochs, Adam lr 1e-3, cosine, batch 64):

* random, l1_norm, network_slimming, thinet, channel_regression — each method's `run`
  through the engine's own stages (load, analyse, PruneContext, the method), then each
  recovery on a copy of the pruned network: fine-tune (E epochs), Scratch-E (re-initialise,
  E epochs) and Scratch-B (re-initialise, E x MACs_full/MACs_pruned epochs), then the
  pipeline's export, parity check and onnxruntime measurements. The method runs once per
  (model, target) and its three recoveries share it, which is what makes the grid
  affordable; the numbers are the same ones `workers.engine.run` reports.
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
import copy
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.engine import _quiet, _short_error, bench_tp  # noqa: E402
from prunery.spec import JobSpec  # noqa: E402
from tests.zoo import ZOO, build_zoo_model, default_cache_dir, write_digits_npz  # noqa: E402
from workers import datasets  # noqa: E402
from workers.engine import export as export_mod  # noqa: E402
from workers.engine import graph, train  # noqa: E402
from workers.engine import load as load_mod  # noqa: E402
from workers.engine.flops import onnx_costs, torch_costs  # noqa: E402
from workers.engine.method import PruneContext  # noqa: E402
from workers.engine.pipeline import LATENCY_BATCHES, _dynamic_batch, _instantiate  # noqa: E402

METHODS = ("random", "l1_norm", "network_slimming", "thinet", "channel_regression")
RECOVERIES = ("finetune", "scratch-E", "scratch-B")
SEED = 0
RECOVERY = {"lr": 1e-3, "batch_size": 64, "optimizer": "adam", "schedule": "cosine"}


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


@dataclass
class Prepared:
    """What the pipeline has after its load and analyse stages (shared by every method)."""

    loaded: load_mod.LoadedModel
    data: train.TensorData
    example: torch.Tensor
    calibration: torch.Tensor
    analysis: graph.Analysis
    base_bytes: bytes
    acc_before: float


def prepare(model_path: Path, data_path: Path) -> Prepared:
    ds = datasets.load_dataset(data_path, seed=SEED)
    data = train.TensorData.from_numpy(ds)
    loaded = load_mod.load(model_path, ds.sample_shape, seed=SEED)
    example = data.x_train[:1].clone()
    gen = torch.Generator().manual_seed(SEED)
    calibration = data.x_train[torch.randperm(len(data.x_train), generator=gen)[:256]]
    analysis = graph.analyse(loaded.module, example, calibration[:16], seed=SEED)
    analysis.lifted = loaded.lifted
    base_bytes = _dynamic_batch(loaded.onnx_model).SerializeToString()
    logits = export_mod.onnx_predict(base_bytes, loaded.input_name, data.x_test.numpy())
    acc = export_mod.topk_accuracy(logits, data.y_test.numpy(), 1)
    return Prepared(loaded, data, example, calibration, analysis, base_bytes, acc)


def spec_for(method: str, target: float, epochs: int, recovery: str = "finetune") -> JobSpec:
    params = {"sparsity_epochs": epochs} if method == "network_slimming" else {}
    mode, _, em = recovery.partition("-")
    return JobSpec(
        method={"name": method, "params": params}, target={"flops": target},
        recovery={"mode": mode, "epochs": epochs, "epochs_mode": em or "E", **RECOVERY}, seed=SEED,
    )


def measure(row: Row, prep: Prepared, model: torch.nn.Module, args: argparse.Namespace) -> None:
    """The pipeline's export + verify stages, numbers only."""
    name = prep.loaded.input_name
    onnx_model = export_mod.export_onnx(model, prep.example, 17, input_name=name)
    pruned_bytes = onnx_model.SerializeToString()
    session = load_mod.ort_session(pruned_bytes)
    _, rel = load_mod.parity(model, session, name, prep.data.x_test[:64].numpy())
    if not rel <= load_mod.PARITY_RTOL:
        row.note = f"parity {rel:.1e}"
    x, y = prep.data.x_test.numpy(), prep.data.y_test.numpy()
    feed = {name: x[:1]}
    base = onnx_costs(_dynamic_batch(prep.loaded.onnx_model), feed).macs
    row.macs_kept = onnx_costs(onnx_model, feed).macs / base
    row.acc_before = prep.acc_before
    row.acc_after = export_mod.topk_accuracy(export_mod.onnx_predict(pruned_bytes, name, x), y, 1)
    row.drop = (row.acc_before - row.acc_after) * 100.0
    for bs in LATENCY_BATCHES:
        before, after = export_mod.interleaved_latency(
            prep.base_bytes, pruned_bytes, name, name, x[:bs], bs, runs=args.runs, threads=args.ort_threads or None
        )
        row.speedup[bs] = before.median_ms / after.median_ms


def bench_method(name: str, prep: Prepared, method: str, target: float, args: argparse.Namespace) -> list[Row]:
    rows = [Row(name, target, method, r) for r in args.recoveries]
    spec = spec_for(method, target, args.epochs)
    t0 = time.perf_counter()
    try:
        torch.manual_seed(SEED)
        _, _, impl = _instantiate(spec)
        base_costs = torch_costs(prep.loaded.module, prep.example)
        ctx = PruneContext(
            spec=spec, model=prep.loaded.module, example=prep.example, calibration=prep.calibration,
            data=prep.data, analysis=prep.analysis, base_costs=base_costs, device=torch.device("cpu"),
            seed=SEED, progress=lambda f, m: None,
        )
        pruned = impl.run(ctx).model.cpu().eval()
    except Exception as exc:  # a failed method is a result too
        for r in rows:
            r.note, r.wall = _short_error(exc), time.perf_counter() - t0
        return rows
    prune_s = time.perf_counter() - t0
    pruned_macs = torch_costs(pruned, prep.example).macs
    acc_pruned = train.accuracy(pruned, prep.data, device=torch.device("cpu"))
    for row in rows:
        t1 = time.perf_counter()
        model = copy.deepcopy(pruned)
        epochs = args.epochs
        if row.recovery.startswith("scratch"):
            if row.recovery == "scratch-B":
                epochs = int(math.ceil(args.epochs * base_costs.macs / max(pruned_macs, 1)))
            train.reinitialize(model, SEED)
        try:
            if epochs > 0:
                ctx.train(model, epochs, lr=RECOVERY["lr"])
            model = model.cpu().eval()
            measure(row, prep, model, args)
        except Exception as exc:
            row.note = _short_error(exc)
        row.epochs, row.prune_s, row.acc_pruned = epochs, prune_s, acc_pruned
        row.wall = prune_s + time.perf_counter() - t1
    return rows


def bench_peer(name: str, model_path: Path, data_path: Path, target: float, args: argparse.Namespace) -> Row:
    ns = SimpleNamespace(target=target, epochs=args.epochs, runs=args.runs, ort_threads=args.ort_threads)
    r = bench_tp(name, model_path, data_path, ns)
    return Row(name, target, "tp magnitude", "finetune", macs_kept=r.macs_kept, speedup=r.speedup,
               acc_before=r.acc_before, acc_after=r.acc_after, drop=r.drop, epochs=args.epochs, wall=r.wall, note=r.note)


# ------------------------------------------------------------------ output


def _f(v: float | None, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def render(rows: list[Row]) -> str:
    head = [
        "| model | target | method | recovery | epochs | MACs kept | speedup b1 | speedup b32 | acc pruned | acc after "
        "| drop (pts) | prune s | wall s | note |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    body = [
        f"| {r.model} | {r.target} | {r.method} | {r.recovery} | {_f(r.epochs, 'd')} | {_f(r.macs_kept, '.3f')} "
        f"| {_f(r.speedup.get(1), '.2f')} | {_f(r.speedup.get(32), '.2f')} | {_f(r.acc_pruned, '.3f')} "
        f"| {_f(r.acc_after, '.4f')} | {_f(r.drop, '.2f')} | {_f(r.prune_s, '.1f')} | {_f(r.wall, '.1f')} | {r.note} |"
        for r in rows
    ]
    return "\n".join(head + body)


def summary(rows: list[Row]) -> str:
    """Mean over the models each method handled, per (target, method, recovery)."""
    lines = [
        "| target | method | recovery | models | mean drop (pts) | mean acc pruned | mean MACs kept | mean speedup b32 | mean wall s |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    keys = list(dict.fromkeys((r.target, r.method, r.recovery) for r in rows))
    for t, m, rec in sorted(keys, key=lambda k: (-k[0], k[1], k[2])):
        mine = [r for r in rows if (r.target, r.method, r.recovery) == (t, m, rec)]
        done = [r for r in mine if r.drop is not None]

        def mean(get, done=done):
            vals = [v for v in (get(r) for r in done) if v is not None]
            return statistics.mean(vals) if vals else None

        lines.append(
            f"| {t} | {m} | {rec} | {len(done)}/{len(mine)} | {_f(mean(lambda r: r.drop), '.2f')} "
            f"| {_f(mean(lambda r: r.acc_pruned), '.3f')} | {_f(mean(lambda r: r.macs_kept), '.3f')} "
            f"| {_f(mean(lambda r: r.speedup.get(32)), '.2f')} | {_f(mean(lambda r: r.wall), '.1f')} |"
        )
    return "\n".join(lines)


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recoveries = list(dict.fromkeys(r.recovery for r in rows))
    fig, axes = plt.subplots(1, len(recoveries), figsize=(5 * len(recoveries), 4), sharey=True, squeeze=False)
    for ax, rec in zip(axes[0], recoveries, strict=True):
        for method in dict.fromkeys(r.method for r in rows if r.recovery == rec):
            pts = []
            for t in sorted({r.target for r in rows}):
                done = [r for r in rows if (r.method, r.recovery, r.target) == (method, rec, t) and r.acc_after is not None]
                if done:
                    pts.append((statistics.mean(r.macs_kept for r in done), statistics.mean(r.acc_after for r in done)))
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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(ZOO), help="comma-separated zoo names (default: all)")
    p.add_argument("--targets", default="0.5,0.25", help="MACs fractions to keep")
    p.add_argument("--epochs", type=int, default=1, help="recovery epochs E, the same for every method")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--recoveries", default=",".join(RECOVERIES))
    p.add_argument("--no-peer", action="store_true", help="skip the Torch-Pruning peer")
    p.add_argument("--runs", type=int, default=10, help="timed onnxruntime runs per latency")
    p.add_argument("--ort-threads", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out")
    args = p.parse_args(argv)
    args.targets = [float(t) for t in args.targets.split(",")]
    args.methods = args.methods.split(",")
    args.recoveries = args.recoveries.split(",")
    bad = [m for m in args.models.split(",") if m not in ZOO] + [r for r in args.recoveries if r not in RECOVERIES]
    if bad:
        p.error(f"unknown {bad}; models: {list(ZOO)}, recoveries: {list(RECOVERIES)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    _quiet()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    command = "command: " + shlex.join([sys.executable, *sys.argv])
    print(command)
    print(f"torch {torch.__version__}, {os.cpu_count()} cpus, targets {args.targets}, recovery {args.epochs} epoch(s), "
          f"{args.runs} latency runs", flush=True)
    rows: list[Row] = []
    t_start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)

    def dump(final: bool = False) -> tuple[str, str]:
        # Rewritten after every method, so a run cut short still leaves its table.
        table, summ = render(rows), summary(rows)
        status = "" if final else "(partial: still running)\n\n"
        (args.out / "methods.md").write_text(f"{command}\n\n{status}{table}\n\n{summ}\n")
        return table, summ

    with tempfile.TemporaryDirectory() as tmp:
        data_path = write_digits_npz(Path(tmp) / "digits.npz")
        for name in args.models.split(","):
            model_path, _ = build_zoo_model(name, default_cache_dir(), opset=17)
            try:
                prep = prepare(model_path, data_path)
            except Exception as exc:
                rows.append(Row(name, 0.0, "(all)", "-", note=_short_error(exc)))
                continue
            for target in args.targets:
                for method in args.methods:
                    rows.extend(bench_method(name, prep, method, target, args))
                    print(f"  {name} {target} {method}: " + ", ".join(
                        f"{r.recovery} drop {_f(r.drop, '.2f')}" + (f" ({r.note})" if r.note else "") for r in rows[-len(args.recoveries):]
                    ), file=sys.stderr, flush=True)
                    dump()
                if not args.no_peer:
                    rows.append(bench_peer(name, model_path, data_path, target, args))
                    dump()
    table, summ = dump(final=True)
    print()
    print(table)
    print()
    print(summ)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    plot(rows, args.out / "methods.png")
    print(f"wrote {args.out / 'methods.md'} and {args.out / 'methods.png'}")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
