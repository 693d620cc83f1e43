"""FLOP vs truncated SVD on the character transformer, at the same parameter count.

    .venv/bin/python -m benchmarks.lm [--targets 0.6,0.4] [--epochs 2] [--flop-epochs 3] [--runs 30]

Both methods factorise the same Linear layers and end with the same fine-tune; FLOP learns
which rank-one components to keep (hard-concrete L0 gates under an augmented Lagrangian),
SVD keeps the largest singular components at one rank fraction per layer. The table gives
bits per character (the model reads ASCII bytes of the Python standard library's source),
measured in onnxruntime on held-out text, and the measured speedup.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks.common import timed_run
from prunery.spec import JobSpec
from tests import zoo


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--targets", default="0.6,0.4", help="fractions of parameters to keep")
    ap.add_argument("--epochs", type=int, default=2, help="recovery (fine-tune) epochs for both")
    ap.add_argument("--flop-epochs", type=int, default=3, help="FLOP's L0 training epochs")
    ap.add_argument("--runs", type=int, default=30, help="latency runs")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds")
    args = ap.parse_args()

    model_path, bpc = zoo.build_lm_model(zoo.default_cache_dir())
    work = Path(tempfile.mkdtemp(prefix="prunery-lm-"))
    data = zoo.write_text_npz(work / "text.npz")
    print(f"command: {' '.join(sys.argv)}")
    print(
        f"model: {model_path.name} (character transformer, test bpc after training {bpc:.3f}); data: {data}"
    )
    print()
    print(
        "| method | target params | achieved | bpc before | bpc after | Δ bpc | perplexity after | speedup b1 | speedup b32 | wall s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    summary: dict[tuple[str, float], list[float]] = {}
    for target in (float(t) for t in args.targets.split(",")):
        for seed in (int(s) for s in args.seeds.split(",")):
            for method, params in (("flop", {"epochs": args.flop_epochs}), ("svd", {})):
                spec = JobSpec(
                    task="language_modeling",
                    method={"name": method, "params": params},
                    target={"params": target},
                    recovery={"epochs": args.epochs},
                    seed=seed,
                )
                out = work / f"{method}-{target}-{seed}"
                report, wall, lat = timed_run(spec, model_path, data, out, args.runs)
                bpt = report.metrics["bits_per_token"]
                summary.setdefault((method, target), []).append(bpt.after)
                print(
                    f"| {method} (seed {seed}) | {target:.2f} | {report.target.achieved:.4f} | {bpt.before:.4f} | "
                    f"{bpt.after:.4f} | {bpt.after - bpt.before:+.4f} | {report.metrics['perplexity'].after:.3f} | "
                    f"{lat.get(1, float('nan')):.2f} | {lat.get(32, float('nan')):.2f} | {wall:.1f} |",
                    flush=True,
                )
    print()
    for (method, target), values in sorted(summary.items()):
        print(
            f"{method:5s} at {target:.2f} params: median bpc after {statistics.median(values):.4f} over {len(values)} seed(s)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
