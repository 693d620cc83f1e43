"""Benchmark: does pruning buy real speed? Default (measured) widths vs round_to=1 vs
Torch-Pruning used directly, and `target.latency`.

    .venv/bin/python -m benchmarks.latency [--models a,b] [--target 0.5] [--runs 30] [--ort-threads 1]
                                           [--latency-target 0.5] [--skip-latency-target]
                                           [--latency-target-only]

Models: the test zoo (sklearn digits, 8x8, trained, from the zoo cache) and torchvision
resnet18, mobilenet_v3_small, efficientnet_b0, regnet_x_400mf, squeezenet1_1 (random init,
10 classes, exported at 64x64, synthetic data). Recovery none everywhere: speed does not
depend on weights, and this keeps the run short.

Rows per model, all at the same MAC budget (`--target`, l1_norm, uniform allocation):
* default   — `engine.pipeline.run` with the spec's defaults (widths chosen per layer
              by timing it in onnxruntime; never-slower check; latency-aware allocation);
* round_to=1 — the same with `export.round_to = 1` (the old default, widths ignore kernels);
* tp        — Torch-Pruning's BasePruner + MagnitudeImportance(p=1), one uniform ratio bisected
              to the same MACs (benchmarks/engine.py's peer), exported the same way;
* latency   — `target.latency = --latency-target` at batch 1; the achieved fraction is the
              report's (verify stage) and is measured once more here, independently.

Speedups: onnxruntime CPU, original and pruned timed alternately, median of `--runs` runs
after warm-up, at batch 1 and 32. "eff" = speedup / MAC reduction = speedup x MACs kept (1.0
is the physical limit of a MAC cut). A benchmark, not a test: failures become table cells.
"""

from __future__ import annotations

import argparse
import io
import os
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

from core.validation import datasets
from engine import export as export_mod
from engine import load as load_mod
from engine.flops import onnx_costs
from engine.pipeline import dynamic_batch, run
from methods import registry
from prunery.spec import JobSpec
from tests.zoo import ZOO, build_zoo_model, default_cache_dir, write_digits_npz

ROOT = Path(__file__).resolve().parents[1]

TORCHVISION = (
    "resnet18",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "regnet_x_400mf",
    "squeezenet1_1",
)
ZOO_IMAGES = tuple(n for n in ZOO)  # all zoo models are digits classifiers
BATCHES = (1, 32)


@dataclass
class Row:
    model: str
    config: str
    macs_kept: float | None = None
    speedup: dict[int, float] = field(default_factory=dict)
    latency_kept: float | None = None  # latency target rows: the report's achieved
    latency_again: float | None = None  # and this script's own re-measurement
    steps: str = ""
    wall: float | None = None
    note: str = ""

    def eff(self, bs: int) -> float | None:
        s = self.speedup.get(bs)
        return None if s is None or self.macs_kept is None else s * self.macs_kept


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0].split(";")[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:140].replace("|", "/")


def torchvision_job(name: str, root: Path, size: int = 64) -> tuple[Path, Path]:
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, num_classes=10).eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.randn(2, 3, size, size),),
            buf,
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )
    path = root / f"{name}.onnx"
    path.write_bytes(buf.getvalue())
    data = root / f"synthetic{size}.npz"
    if not data.exists():
        rng = np.random.default_rng(0)
        np.savez(
            data,
            x_train=rng.standard_normal((96, 3, size, size)).astype(np.float32),
            y_train=rng.integers(0, 10, 96),
            x_test=rng.standard_normal((64, 3, size, size)).astype(np.float32),
            y_test=rng.integers(0, 10, 64),
        )
    return path, data


def engine_row(
    name: str, config: str, model: Path, data: Path, args: argparse.Namespace, **spec_over
) -> Row:
    row = Row(name, config)
    body = {
        "method": {"name": "l1_norm"},
        "target": {"flops": args.target},
        "recovery": {"mode": "none"},
        "seed": 0,
    }
    body.update(spec_over)
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as out:
            report = run(
                JobSpec.model_validate(body),
                model,
                data,
                out,
                latency_runs=args.runs,
                latency_threads=args.ort_threads,
                catalog=registry,
            )
            if report.target.kind == "latency":
                row.latency_kept = report.target.achieved
                row.latency_again = _remeasure(
                    model,
                    data,
                    Path(out) / "model.onnx",
                    args,
                    int(body["target"].get("latency_batch", 1)),
                )
    except Exception as exc:
        row.note, row.wall = _short(exc), time.perf_counter() - t0
        return row
    row.wall = time.perf_counter() - t0
    row.macs_kept = report.macs.ratio
    row.speedup = {
        lat.batch_size: lat.speedup for lat in report.latency_ms if lat.batch_size in BATCHES
    }
    lw = report.method_details.get("latency_widths", {})
    if lw.get("steps"):
        row.steps = " ".join(f"{k}:{v}" for k, v in lw["steps"].items()) + (
            f" ({lw['mode']})" if lw.get("mode") != "measured" else ""
        )
    checks = lw.get("checks", [])
    if len(checks) > 1:
        tried = ", ".join(
            str(c["widths"])
            + (
                " (head to head " + "/".join(f"{v:.2f}" for v in c["vs_kept"].values()) + "x)"
                if "vs_kept" in c
                else ""
            )
            for c in checks[1:]
        )
        row.note += f"tried {tried}; kept {lw.get('kept', checks[0]['widths'])}. "
    for g in report.gates:
        if not g.passed:
            row.note += f"gate {g.name} failed ({g.value:.2f}). "
    if not report.target.met:
        row.note += f"target missed ({report.target.achieved:.3f}). "
    return row


def _remeasure(
    model: Path, data: Path, pruned: Path, args: argparse.Namespace, batch: int
) -> float:
    """The latency fraction measured again here: fresh sessions, the engine's own baseline."""
    ds = datasets.load_dataset(data, seed=0)
    loaded = load_mod.load(model, ds.sample_shape, seed=0)
    base = dynamic_batch(loaded.onnx_model).SerializeToString()
    x = ds.x_test[:batch].astype(np.float32)
    a, b = export_mod.interleaved_latency(
        base,
        pruned.read_bytes(),
        loaded.input_name,
        loaded.input_name,
        x,
        batch,
        runs=max(args.runs, 30),
        threads=args.ort_threads,
    )
    return b.median_ms / a.median_ms


def tp_row(name: str, model: Path, data: Path, args: argparse.Namespace) -> Row:
    from benchmarks.engine import tp_search  # benchmarks/engine.py's Torch-Pruning peer

    row = Row(name, "tp direct")
    t0 = time.perf_counter()
    try:
        loaded, tdata, example, pruned = tp_search(model, data, args.target)
        pruned_onnx = export_mod.export_onnx(
            pruned.eval(), example, 17, input_name=loaded.input_name
        )
        base = dynamic_batch(loaded.onnx_model)
        x = tdata.x_test.numpy()
        feed = {loaded.input_name: x[:1]}
        row.macs_kept = onnx_costs(pruned_onnx, feed).macs / onnx_costs(base, feed).macs
        for bs in BATCHES:
            a, b = export_mod.interleaved_latency(
                base.SerializeToString(),
                pruned_onnx.SerializeToString(),
                loaded.input_name,
                loaded.input_name,
                x[:bs],
                bs,
                runs=args.runs,
                threads=args.ort_threads,
            )
            row.speedup[bs] = a.median_ms / b.median_ms
    except Exception as exc:
        row.note = "tp failed: " + _short(exc)
        row.macs_kept = None
    row.wall = time.perf_counter() - t0
    return row


def _f(v: float | None, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def render(rows: list[Row]) -> str:
    out = [
        "| model | config | MACs kept | speedup b1 | speedup b32 | eff b1 | eff b32 | steps (step:groups) | wall s | note |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for r in rows:
        if r.config.startswith("latency"):
            continue
        out.append(
            f"| {r.model} | {r.config} | {_f(r.macs_kept, '.3f')} | {_f(r.speedup.get(1), '.2f')} | {_f(r.speedup.get(32), '.2f')} "
            f"| {_f(r.eff(1), '.2f')} | {_f(r.eff(32), '.2f')} | {r.steps} | {_f(r.wall, '.0f')} | {r.note} |"
        )
    return "\n".join(out)


def render_latency(rows: list[Row], requested: float) -> str:
    out = [
        "| model | batch | requested | achieved (report, verify) | achieved (re-measured here) | within ±5% | MACs kept | wall s | note |",
        "|---|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for r in rows:
        if not r.config.startswith("latency"):
            continue
        ok = r.latency_kept is not None and abs(r.latency_kept - requested) <= 0.05 * requested
        again = r.latency_again is not None and abs(r.latency_again - requested) <= 0.05 * requested
        out.append(
            f"| {r.model} | {r.config.split('b')[-1]} | {requested} | {_f(r.latency_kept, '.3f')} | {_f(r.latency_again, '.3f')} "
            f"| {'yes' if ok else 'no'} / {'yes' if again else 'no'} | {_f(r.macs_kept, '.3f')} | {_f(r.wall, '.0f')} | {r.note} |"
        )
    return "\n".join(out)


def summary(rows: list[Row]) -> str:
    lines = []
    for config in dict.fromkeys(r.config for r in rows if not r.config.startswith("latency")):
        done = [r for r in rows if r.config == config and r.macs_kept is not None]
        if not done:
            continue
        slow = [f"{r.model} b{b} {s:.2f}" for r in done for b, s in r.speedup.items() if s < 1.0]
        effs = [e for r in done for e in (r.eff(1), r.eff(32)) if e is not None]
        lines.append(
            f"{config}: {len(done)} models; slower than the original at some batch: {len(slow)} "
            f"({', '.join(slow) or 'none'}); median eff (speedup / MAC reduction, b1 and b32 pooled) "
            f"{statistics.median(effs):.2f}; median eff b1 {statistics.median([r.eff(1) for r in done if r.eff(1)]):.2f}, "
            f"b32 {statistics.median([r.eff(32) for r in done if r.eff(32)]):.2f}"
        )
        # The 8x8 zoo at batch 1 is dispatch-bound (20-50 us a pass); the families apart:
        for family, members in (("zoo", ZOO_IMAGES), ("torchvision", TORCHVISION)):
            part = [r for r in done if r.model in members]
            if part and len(part) < len(done):
                cells = {b: [e for r in part if (e := r.eff(b)) is not None] for b in BATCHES}
                if not (cells[1] and cells[32]):
                    continue
                lines.append(
                    f"  {family} ({len(part)}): median eff "
                    f"{statistics.median(cells[1] + cells[32]):.2f}; b1 {statistics.median(cells[1]):.2f}, "
                    f"b32 {statistics.median(cells[32]):.2f}"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join((*ZOO_IMAGES, *TORCHVISION)))
    p.add_argument(
        "--target", type=float, default=0.5, help="fraction of MACs to keep (default 0.5)"
    )
    p.add_argument("--latency-target", type=float, default=0.5)
    p.add_argument("--skip-latency-target", action="store_true")
    p.add_argument(
        "--latency-target-only",
        action="store_true",
        help="only the latency-target rows (not the default / round_to=1 / tp speedups)",
    )
    p.add_argument(
        "--latency-batch",
        type=int,
        default=1,
        help="batch of the latency target, torchvision models (default 1)",
    )
    p.add_argument(
        "--zoo-latency-batch",
        type=int,
        default=32,
        help="batch of the latency target, zoo models (default 32: at 8x8 and batch 1 a forward pass is ~40 us, "
        "mostly per-op dispatch that no width removes)",
    )
    p.add_argument("--runs", type=int, default=30)
    p.add_argument(
        "--ort-threads",
        type=int,
        default=1,
        help="onnxruntime threads (default 1: steadier on a shared machine; 0 = all cores)",
    )
    p.add_argument("--size", type=int, default=64, help="torchvision input size")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    print("command: " + shlex.join([sys.executable, *sys.argv]))
    print(
        f"torch {torch.__version__}, onnxruntime {version('onnxruntime')}, torch-pruning {version('torch-pruning')}, "
        f"{os.cpu_count()} cpus, load average {os.getloadavg()[0]:.1f}, onnxruntime threads {args.ort_threads or 'all'}, "
        f"{args.runs} interleaved runs, MAC target {args.target}, recovery none"
    )
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        digits = write_digits_npz(root / "digits.npz")
        for name in args.models.split(","):
            if name in ZOO:
                model, data = build_zoo_model(name, default_cache_dir(), opset=17)[0], digits
            elif name in TORCHVISION:
                model, data = torchvision_job(name, root, args.size)
            else:
                p.error(f"unknown model {name!r}")
            if not args.latency_target_only:
                rows.append(engine_row(name, "default", model, data, args))
                rows.append(
                    engine_row(name, "round_to=1", model, data, args, export={"round_to": 1})
                )
                rows.append(tp_row(name, model, data, args))
            if not args.skip_latency_target:
                lb = args.zoo_latency_batch if name in ZOO else args.latency_batch
                rows.append(
                    engine_row(
                        name,
                        f"latency b{lb}",
                        model,
                        data,
                        args,
                        target={"latency": args.latency_target, "latency_batch": lb},
                        gates={"min_speedup": None},
                    )
                )
            print(f"  done {name} (load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
            print(render([r for r in rows if r.model == name]), file=sys.stderr, flush=True)
    print()
    print(render(rows))
    print()
    print(summary(rows))
    if not args.skip_latency_target:
        print()
        print(render_latency(rows, args.latency_target))


if __name__ == "__main__":
    main()
