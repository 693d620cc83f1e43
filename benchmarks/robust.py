"""Benchmark: the robust (ANP) and dynamic (SANP) methods against l1_norm, on the test zoo.

    .venv/bin/python -m benchmarks.robust [--models vgg,resnet_basic] [--sanp-models resnet_basic]
        [--targets 0.3,0.5,0.7] [--epochs 3] [--epsilon 0.1] [--pgd-steps 10]
        [--anp-mask-epochs 5] [--sanp-epochs 5] [--cache-dir DIR]

Part A — robustness at one budget (flops 0.5): the original model, l1_norm, anp and anp
with adversarial fine-tuning, each through `engine.run`. Every exported ONNX is
loaded back (the engine's own loader) and attacked the same way: white-box FGSM and PGD
(random start, `--pgd-steps` steps of ε/4) with ε a fraction of the data's value range.
Question: does ANP keep more of the PGD accuracy than magnitude pruning, as the paper reports?

Part B — dynamic vs static: SANP's measured mean MACs (± std over the test samples) and
accuracy against l1_norm pruned statically to the same fraction, at each target.

Prints two Markdown tables and writes benchmarks/out/robust.png. A benchmark, not a test:
it never asserts. Single seed (0); digits test split = 360 samples, so one sample = 0.28 pp.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from core.validation import datasets
from engine import load as load_mod
from engine import train as train_mod
from engine.pipeline import run
from methods import registry
from methods.anp.attacks import Attack, robust_accuracy
from prunery.spec import JobSpec
from tests.zoo import build_zoo_model, default_cache_dir, write_digits_npz

ROOT = Path(__file__).resolve().parents[1]

OUT = ROOT / "benchmarks" / "out"


@dataclass
class RobustRow:
    model: str
    method: str
    macs_kept: float
    clean: float
    fgsm: float
    pgd: float
    seconds: float
    note: str = ""


@dataclass
class DynamicRow:
    model: str
    target: float
    method: str
    macs_kept: float
    macs_std: float | None
    accuracy: float
    extra: dict = field(default_factory=dict)
    seconds: float = 0.0


def _data(path: Path) -> train_mod.TensorData:
    ds = datasets.load_dataset(
        path,
        task="classification",
        split=0.2,
        seed=0,
        image_size=None,
        grayscale=False,
        mean=None,
        std=None,
    )
    return train_mod.TensorData.from_numpy(ds)


def _attack_onnx(path: Path, data: train_mod.TensorData, attack: Attack) -> dict[str, float]:
    module = load_mod.load(path, tuple(data.x_train.shape[1:]), seed=0).module
    return robust_accuracy(module, data.x_test, data.y_test, attack, seed=0)


def _engine(
    method: str, params: dict, model: Path, data: Path, target: float, epochs: int, work: Path
):
    spec = JobSpec(
        method={"name": method, "params": params},
        target={"flops": target},
        recovery={"epochs": epochs},
    )
    t0 = time.perf_counter()
    report = run(spec, model, data, work, latency_runs=5, catalog=registry)
    return report, time.perf_counter() - t0


def part_a(
    models, data_path, data, epochs, attack, eps_frac, pgd_steps, mask_epochs, cache, tmp
) -> list[RobustRow]:
    rows: list[RobustRow] = []
    anp_params = {
        "epsilon": eps_frac,
        "pgd_step_size": eps_frac / 4,
        "pgd_steps": pgd_steps,
        "eval_pgd_steps": pgd_steps,
        "mask_epochs": mask_epochs,
    }
    variants = [
        ("l1_norm", "l1_norm", {}),
        ("anp", "anp", anp_params),
        ("anp+adv_finetune", "anp", {**anp_params, "adversarial_finetune": True}),
    ]
    for name in models:
        onnx_path, _ = build_zoo_model(name, cache)
        acc = _attack_onnx(onnx_path, data, attack)
        rows.append(RobustRow(name, "original", 1.0, acc["clean"], acc["fgsm"], acc["pgd"], 0.0))
        for label, method, params in variants:
            work = tmp / f"a-{name}-{label}"
            report, secs = _engine(method, params, onnx_path, data_path, 0.5, epochs, work)
            acc = _attack_onnx(work / "model.onnx", data, attack)
            note = ""
            if method == "anp":
                d = report.method_details
                note = f"{d['channels_below_threshold']} ch. E[π]<1e-3, {d['channels_removed']} removed"
            rows.append(
                RobustRow(
                    name,
                    label,
                    report.target.achieved,
                    acc["clean"],
                    acc["fgsm"],
                    acc["pgd"],
                    secs,
                    note,
                )
            )
            print(
                f"  {name:18s} {label:18s} clean {acc['clean']:.4f} pgd {acc['pgd']:.4f} ({secs:.0f}s)",
                flush=True,
            )
    return rows


def part_b(models, data_path, targets, epochs, sanp_epochs, cache, tmp) -> list[DynamicRow]:
    rows: list[DynamicRow] = []
    for name in models:
        onnx_path, _ = build_zoo_model(name, cache)
        for target in targets:
            for method in ("l1_norm", "sanp"):
                work = tmp / f"b-{name}-{method}-{target}"
                params = {"epochs": sanp_epochs} if method == "sanp" else {}
                report, secs = _engine(method, params, onnx_path, data_path, target, epochs, work)
                dyn = report.dynamic or {}
                std = dyn["macs_std"] / report.macs.before if dyn else None
                extra = {"keep": dyn.get("mean_keep_rate")} if dyn else {}
                rows.append(
                    DynamicRow(
                        name,
                        target,
                        method,
                        report.target.achieved,
                        std,
                        report.accuracy.after,
                        extra,
                        secs,
                    )
                )
                print(
                    f"  {name:18s} {method:8s} target {target} kept {report.target.achieved:.4f} "
                    f"acc {report.accuracy.after:.4f} ({secs:.0f}s)",
                    flush=True,
                )
    return rows


def table_a(rows: list[RobustRow], eps_frac: float, attack: Attack) -> str:
    lines = [
        f"Robustness at flops 0.5 (ε = {eps_frac} of the data range = {attack.epsilon:.4f}; PGD {attack.steps} steps "
        f"of {attack.step_size:.4f}, random start; FGSM at ε)",
        "",
        "| model | method | MACs kept | clean | FGSM | PGD | PGD / clean | seconds | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.method} | {r.macs_kept:.4f} | {r.clean:.4f} | {r.fgsm:.4f} | {r.pgd:.4f} | "
            f"{r.pgd / r.clean if r.clean else 0:.3f} | {r.seconds:.0f} | {r.note} |"
        )
    return "\n".join(lines)


def table_b(rows: list[DynamicRow]) -> str:
    lines = [
        "Dynamic (SANP, measured mean MACs over the test split) vs static (l1_norm)",
        "",
        "| model | target | method | MACs kept | ± std (per sample) | accuracy | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        std = f"{r.macs_std:.4f}" if r.macs_std is not None else "static"
        lines.append(
            f"| {r.model} | {r.target} | {r.method} | {r.macs_kept:.4f} | {std} | {r.accuracy:.4f} | {r.seconds:.0f} |"
        )
    return "\n".join(lines)


def plot(rows_a: list[RobustRow], rows_b: list[DynamicRow], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    models = sorted({r.model for r in rows_a}, key=[r.model for r in rows_a].index)
    methods = sorted({r.method for r in rows_a}, key=[r.method for r in rows_a].index)
    width = 0.8 / max(len(methods), 1)
    for j, m in enumerate(methods):
        xs, clean, pgd = [], [], []
        for i, model in enumerate(models):
            r = next((r for r in rows_a if r.model == model and r.method == m), None)
            if r:
                xs.append(i + j * width)
                clean.append(r.clean)
                pgd.append(r.pgd)
        ax.bar(xs, clean, width, alpha=0.35, color=f"C{j}")
        ax.bar(xs, pgd, width, color=f"C{j}", label=m)
    ax.set_xticks([i + width * (len(methods) - 1) / 2 for i in range(len(models))], models)
    ax.set_ylabel("accuracy (solid: PGD, light: clean)")
    ax.set_title("ANP vs l1_norm at flops 0.5")
    ax.legend(fontsize=8)
    ax = axes[1]
    for k, (model, method) in enumerate(sorted({(r.model, r.method) for r in rows_b})):
        pts = sorted(
            (r for r in rows_b if r.model == model and r.method == method),
            key=lambda r: r.macs_kept,
        )
        ax.errorbar(
            [r.macs_kept for r in pts],
            [r.accuracy for r in pts],
            xerr=[r.macs_std or 0 for r in pts],
            marker="o",
            capsize=3,
            label=f"{model} {method}",
            color=f"C{k}",
        )
    ax.set_xlabel("MACs kept (SANP: mean over samples, bar = ±1 std)")
    ax.set_ylabel("test accuracy")
    ax.set_title("SANP (dynamic) vs l1_norm (static)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", default="vgg,resnet_basic")
    ap.add_argument("--sanp-models", default="resnet_basic")
    ap.add_argument("--targets", default="0.3,0.5,0.7")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument(
        "--epsilon", type=float, default=0.1, help="attack radius as a fraction of the data range"
    )
    ap.add_argument("--pgd-steps", type=int, default=10)
    ap.add_argument("--anp-mask-epochs", type=int, default=5)
    ap.add_argument("--sanp-epochs", type=int, default=5)
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        data_path = write_digits_npz(tmp / "digits.npz")
        data = _data(data_path)
        attack = Attack.scaled(data.x_train, args.epsilon, args.epsilon / 4, args.pgd_steps)
        print("Part A: robustness", flush=True)
        rows_a = part_a(
            [m for m in args.models.split(",") if m],
            data_path,
            data,
            args.epochs,
            attack,
            args.epsilon,
            args.pgd_steps,
            args.anp_mask_epochs,
            cache,
            tmp,
        )
        print("Part B: dynamic vs static", flush=True)
        rows_b = part_b(
            [m for m in args.sanp_models.split(",") if m],
            data_path,
            [float(t) for t in args.targets.split(",")],
            args.epochs,
            args.sanp_epochs,
            cache,
            tmp,
        )
    print()
    print(table_a(rows_a, args.epsilon, attack))
    print()
    print(table_b(rows_b))
    png = OUT / "robust.png"
    plot(rows_a, rows_b, png)
    print(f"\nplot: {png.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
