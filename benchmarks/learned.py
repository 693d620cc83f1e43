"""Benchmark: learned widths (pruning_from_scratch, tas) against uniform l1_norm.

    .venv/bin/python -m benchmarks.learned [--models a,b] [--target 0.25] [--epochs 3]
        [--gate-epochs 10] [--search-epochs 10] [--runs 20] [--out benchmarks/out]

Every zoo model (sklearn digits, opset 17) is pruned to `target` of its MACs by each
configuration below through the whole engine (`engine.pipeline.run`), with the same
recovery epochs for all; every number comes from the engine's report (onnxruntime accuracy
on the test split, MACs counted on the ONNX graphs, interleaved latency):

* l1_norm          uniform ratios (Li et al.), fine-tuned from the uploaded weights;
* l1_norm/scratch  the same architecture re-initialised and trained from scratch — the
                   recovery pruning_from_scratch gets, so the two differ only in the widths;
* pfs              pruning_from_scratch (gates on frozen random weights, global ratio),
                   trained from scratch (the method forces it);
* tas              tas with the paper's defaults (architecture Adam lr 1e-3), fine-tuned from
                   the searched weights with distillation from the uploaded model;
* tas/arch_lr=0.05 tas with a larger architecture learning rate: our data gives ~11
                   architecture steps per epoch against the paper's hundreds, so at 1e-3
                   the width distributions hardly move from uniform.

Prints one Markdown table and a summary, writes benchmarks/out/learned.json and a plot
benchmarks/out/learned.png. A benchmark, not a test: it never asserts.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import warnings
from pathlib import Path

from benchmarks.common import timed_run
from prunery.spec import JobSpec
from tests.zoo import ZOO, build_zoo_model, default_cache_dir, write_digits_npz

ROOT = Path(__file__).resolve().parents[1]


def configs(gate_epochs: int, search_epochs: int) -> dict[str, dict]:
    return {
        "l1_norm": {"method": {"name": "l1_norm", "params": {"allocation": "uniform"}}},
        "l1_norm/scratch": {
            "method": {"name": "l1_norm", "params": {"allocation": "uniform"}},
            "recovery": {"mode": "scratch"},
        },
        "pfs": {"method": {"name": "pruning_from_scratch", "params": {"gate_epochs": gate_epochs}}},
        "tas": {"method": {"name": "tas", "params": {"search_epochs": search_epochs}}},
        "tas/arch_lr=0.05": {
            "method": {"name": "tas", "params": {"search_epochs": search_epochs, "arch_lr": 0.05}}
        },
    }


def bench_one(name: str, label: str, cfg: dict, args, data: Path, work: Path) -> dict:
    model, _ = build_zoo_model(name, default_cache_dir(), opset=17)
    recovery = {"epochs": args.epochs, **cfg.get("recovery", {})}
    spec = JobSpec(method=cfg["method"], target={"flops": args.target}, recovery=recovery)
    out = work / f"{name}-{label.replace('/', '_')}"
    report, wall, lat = timed_run(spec, model, data, out, args.runs)
    acc = report.accuracy
    return {
        "model": name,
        "config": label,
        "acc_before": acc.before,
        "acc_after": acc.after,
        "drop_pp": acc.drop,
        "macs_kept": report.target.achieved,
        "met": report.target.met,
        "speedup_b1": lat.get(1),
        "speedup_b32": lat.get(32),
        "wall_s": round(wall, 1),
        "prune_s": report.stage_seconds.get("prune"),
        "recovery": report.recovery["mode_used"],
        "widths": [
            (w["channels_before"], w["channels_after"])
            for w in report.method_details.get("widths", [])
        ],
    }


def table(rows: list[dict]) -> str:
    head = (
        "| model | config | acc before | acc after | drop (pp) | MACs kept | speedup b1 | "
        "speedup b32 | wall (s) |\n|---|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['config']} | {r['acc_before']:.3f} | {r['acc_after']:.3f} | "
            f"{r['drop_pp']:.2f} | {r['macs_kept']:.4f}{'' if r['met'] else ' (missed)'} | "
            f"{r['speedup_b1']:.2f} | {r['speedup_b32']:.2f} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def summary(rows: list[dict], labels: list[str]) -> str:
    by = {(r["model"], r["config"]): r for r in rows}
    models = sorted({r["model"] for r in rows}, key=list(ZOO).index)
    out = [
        "| config | mean drop (pp) | median drop (pp) | beats l1_norm | mean wall (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for label in labels:
        drops = [by[(m, label)]["drop_pp"] for m in models if (m, label) in by]
        if not drops:
            continue
        wins = sum(
            1
            for m in models
            if (m, label) in by
            and (m, "l1_norm") in by
            and by[(m, label)]["drop_pp"] < by[(m, "l1_norm")]["drop_pp"]
        )
        walls = [by[(m, label)]["wall_s"] for m in models if (m, label) in by]
        out.append(
            f"| {label} | {statistics.mean(drops):.2f} | {statistics.median(drops):.2f} | "
            f"{wins}/{len(drops)} | {statistics.mean(walls):.0f} |"
        )
    return "\n".join(out)


def plot(rows: list[dict], labels: list[str], path: Path, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows}, key=list(ZOO).index)
    by = {(r["model"], r["config"]): r for r in rows}
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(models)), 3.8))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        xs = [j + i * width for j, m in enumerate(models) if (m, label) in by]
        ys = [by[(m, label)]["drop_pp"] for m in models if (m, label) in by]
        ax.bar(xs, ys, width, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(models))], models, rotation=20)
    ax.set_ylabel("accuracy drop (pp, lower is better)")
    ax.set_title(f"learned widths vs uniform l1_norm at {target} MACs")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", default=",".join(ZOO))
    ap.add_argument("--configs", default=None, help="comma-separated subset of the configurations")
    ap.add_argument("--target", type=float, default=0.25)
    ap.add_argument(
        "--epochs", type=int, default=3, help="recovery epochs, the same for every config"
    )
    ap.add_argument("--gate-epochs", type=int, default=10)
    ap.add_argument("--search-epochs", type=int, default=10)
    ap.add_argument("--runs", type=int, default=20, help="latency runs per batch size")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out")
    ap.add_argument(
        "--from-json", action="store_true", help="only print the table and plot of out/learned.json"
    )
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    all_cfgs = configs(args.gate_epochs, args.search_epochs)
    labels = args.configs.split(",") if args.configs else list(all_cfgs)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    if args.from_json:
        rows = json.loads((args.out / "learned.json").read_text())
        labels = [label for label in labels if any(r["config"] == label for r in rows)]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = write_digits_npz(work / "digits.npz")
        for name in [] if args.from_json else args.models.split(","):
            for label in labels:
                try:
                    row = bench_one(name, label, all_cfgs[label], args, data, work)
                except Exception as exc:  # a benchmark reports failures, it does not stop
                    print(f"{name} {label}: FAILED {type(exc).__name__}: {exc}", flush=True)
                    continue
                rows.append(row)
                print(
                    f"{name:18s} {label:18s} drop {row['drop_pp']:6.2f} pp  MACs {row['macs_kept']:.4f}  "
                    f"wall {row['wall_s']:.0f}s",
                    flush=True,
                )
                (args.out / "learned.json").write_text(json.dumps(rows, indent=1))
    print()
    if args.from_json:
        print(f"rows of {args.out / 'learned.json'} (settings as that run was given)")
    else:
        print(
            f"target: {args.target} of the MACs; recovery epochs: {args.epochs}; "
            f"gate epochs {args.gate_epochs}; search epochs {args.search_epochs}"
        )
    print(table(rows))
    print()
    print(summary(rows, labels))
    if rows:
        plot(rows, labels, args.out / "learned.png", args.target)
        print(f"\nplot: {args.out / 'learned.png'}; rows: {args.out / 'learned.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
