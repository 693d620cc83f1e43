"""Coverage: does every torchvision classification model prune? One row per model and exporter.

    .venv/bin/python -m benchmarks.coverage [--models resnet18,shufflenet_v2_x0_5] [--exporters legacy,dynamo]
                                              [--size 64] [--timeout 600] [--max-params 100] [--runs 20]

For each model that torchvision builds offline (random init, 10 classes) and each exporter
(`torch.onnx.export(dynamo=False, opset 17)` and the dynamo exporter), a child process exports
it at SIZE x SIZE and runs the engine (`l1_norm`, target flops 0.5, `recovery none`), then
prints one Markdown row: loads?, groups prunable / excluded, achieved fraction, analyse
seconds, the child's peak RSS, and the onnxruntime speedup at batch 1 / 32. A child that runs
past --timeout is killed and reported as such, so the table always finishes; models over
--max-params million parameters are listed as skipped (select them with --models to run them).
A benchmark, not a test: failures become table cells. Run on a quiet machine for timings.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _child(name: str, exporter: str, size: int, runs: int) -> dict:
    """Runs in its own process: export, prune, report one row as a dict."""
    import resource
    import warnings

    warnings.simplefilter("ignore")
    import torch

    torch.set_num_threads(int(os.environ.get("COVERAGE_THREADS", "2")))
    from engine import run
    from methods import registry
    from prunery.spec import JobSpec
    from tests.engine import cnnkit

    row: dict = {"model": name, "exporter": exporter, "loads": False}
    seen = {"stage": "export", "groups": None}

    def progress(stage: str, fraction: float, message: str | None) -> None:
        seen["stage"] = stage
        if stage == "analyse" and message and "prunable groups" in message:
            seen["groups"] = message

    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        try:
            path = cnnkit.export(cnnkit.full(name), Path(d) / "m.onnx", size, exporter == "dynamo")
            row["export_s"] = round(time.perf_counter() - t0, 1)
            seen["stage"] = "load"
            data = cnnkit.image_npz(Path(d) / "d.npz", size, train=32, test=32)
            spec = JobSpec(
                method={"name": "l1_norm"}, target={"flops": 0.5}, recovery={"mode": "none"}
            )
            report = run(
                spec,
                path,
                data,
                Path(d) / "out",
                progress=progress,
                latency_runs=runs,
                catalog=registry,
            )
            row.update(
                loads=True,
                achieved=report.target.achieved,
                met=report.target.met,
                analyse_s=report.stage_seconds.get("analyse"),
                excluded=len(report.excluded),
                speedup=[lat.speedup for lat in report.latency_ms],
                parity=report.parity["max_rel_diff"],
                reasons=sorted({e.reason.split(":")[0][:60] for e in report.excluded})[:3],
            )
        except Exception as exc:
            row["loads"] = seen["stage"] not in ("export", "load")
            row["error"] = (
                f"{seen['stage']}: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            )
        if seen["groups"]:
            row["groups"] = seen["groups"].split(" prunable")[0]
    row["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)
    return row


def _models(selected: str | None) -> list[str]:
    import torchvision

    if selected:
        return [m.strip() for m in selected.split(",") if m.strip()]
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _params_millions(name: str) -> float:
    import torch
    import torchvision

    try:
        with torch.device("meta"):  # no memory for the weights
            model = torchvision.models.get_model(name, weights=None, num_classes=10)
    except NotImplementedError:  # an initialiser that meta tensors do not support
        model = torchvision.models.get_model(name, weights=None, num_classes=10)
    return sum(p.numel() for p in model.parameters()) / 1e6


def _fmt(row: dict) -> str:
    if row.get("skipped"):
        return f"| {row['model']} | {row['exporter']} | - | - | - | - | - | - | skipped: {row['skipped']} |"
    loads = "yes" if row.get("loads") else "no"
    groups = f"{row.get('groups', '?')} / {row.get('excluded', '?')}"
    achieved = (
        f"{row['achieved']:.4f}" + ("" if row.get("met") else " (miss)")
        if "achieved" in row
        else "-"
    )
    analyse = f"{row['analyse_s']:.1f}" if row.get("analyse_s") is not None else "-"
    rss = f"{row['peak_rss_gb']:.2f}" if "peak_rss_gb" in row else "-"
    speed = " / ".join(f"{s:.2f}" for s in row.get("speedup", [])) or "-"
    note = row.get("error") or "; ".join(row.get("reasons", []))
    return f"| {row['model']} | {row['exporter']} | {loads} | {groups} | {achieved} | {analyse} | {rss} | {speed} | {note} |"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--models", help="comma-separated torchvision names (default: every classification model)"
    )
    p.add_argument("--exporters", default="legacy,dynamo")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--timeout", type=int, default=600, help="seconds per model and exporter")
    p.add_argument(
        "--max-params",
        type=float,
        default=100.0,
        help="skip models above this many million parameters unless named in --models",
    )
    p.add_argument(
        "--runs", type=int, default=20, help="onnxruntime timing runs per batch size (>= 20)"
    )
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        name, exporter = args.one.split(":")
        print("ROW " + json.dumps(_child(name, exporter, args.size, args.runs)), flush=True)
        return 0
    exporters = [e.strip() for e in args.exporters.split(",")]
    print(
        f"`python benchmarks/coverage.py {' '.join(sys.argv[1:])}` — size {args.size}, l1_norm, flops 0.5, recovery none\n"
    )
    print(
        "| model | exporter | loads? | groups prunable / excluded | achieved | analyse s | peak RSS GB | speedup b1 / b32 | note |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "sdk")])}
    for name in _models(args.models):
        try:
            size_m = _params_millions(name)
        except Exception as exc:
            print(
                _fmt(
                    {
                        "model": name,
                        "exporter": "-",
                        "skipped": f"does not build offline ({type(exc).__name__})",
                    }
                ),
                flush=True,
            )
            continue
        for exporter in exporters:
            if not args.models and size_m > args.max_params:
                print(
                    _fmt(
                        {
                            "model": name,
                            "exporter": exporter,
                            "skipped": f"{size_m:.0f} M parameters > --max-params",
                        }
                    ),
                    flush=True,
                )
                continue
            cmd = [
                sys.executable,
                "-m",
                "benchmarks.coverage",
                "--one",
                f"{name}:{exporter}",
                "--size",
                str(args.size),
                "--runs",
                str(args.runs),
            ]
            try:
                proc = subprocess.run(
                    cmd, capture_output=True, text=True, timeout=args.timeout, env=env, cwd=ROOT
                )
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")), None)
                row = (
                    json.loads(line[4:])
                    if line
                    else {
                        "model": name,
                        "exporter": exporter,
                        "error": f"child exited {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1][:160]}",
                    }
                )
            except subprocess.TimeoutExpired:
                row = {
                    "model": name,
                    "exporter": exporter,
                    "error": f"killed after {args.timeout} s",
                }
            print(_fmt(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
