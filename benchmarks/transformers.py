"""Transformers: Prunery (from ONNX, heads found and rewritten automatically) versus
Torch-Pruning used directly on the same torch modules, with num_heads given by hand.

Each model is trained briefly (digits upsampled to 3x16x16 for the ViTs; a synthetic
token task for the text encoders), exported to ONNX, then pruned to ~0.5 of its MACs by
both tools, fine-tuned 3 epochs, and measured on ONNX with onnxruntime: MACs kept, heads
kept per attention block, accuracy drop and latency speedup (batch 32, CPU).

    PYTHONPATH=.:sdk python benchmarks/transformers.py [--epochs 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from engine import export as export_mod
from engine.flops import onnx_costs
from engine.pipeline import run
from methods import registry
from prunery.spec import JobSpec
from tests.transformers import tfkit


def digits_images() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)
    x = np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)[:, None].repeat(3, axis=1)
    x = (x - 0.3) / 0.4
    y = d.target.astype(np.int64)
    idx = np.random.default_rng(0).permutation(len(y))
    cut = int(0.8 * len(y))
    return {
        "x_train": x[idx[:cut]],
        "y_train": y[idx[:cut]],
        "x_test": x[idx[cut:]],
        "y_test": y[idx[cut:]],
    }


def tokens() -> dict[str, np.ndarray]:
    x, y = tfkit.token_task(2000, seed=0)
    return {"x_train": x[:1600], "y_train": y[:1600], "x_test": x[1600:], "y_test": y[1600:]}


def train(model: nn.Module, data: dict[str, np.ndarray], epochs: int, lr: float = 1e-3) -> None:
    x, y = torch.from_numpy(data["x_train"]), torch.from_numpy(data["y_train"])
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()


def onnx_metrics(path: Path, data: dict[str, np.ndarray]) -> tuple[float, int]:
    model = onnx.load(str(path))
    name = next(
        i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}
    )
    logits = export_mod.onnx_predict(model.SerializeToString(), name, data["x_test"])
    macs = onnx_costs(model, {name: data["x_test"][:1]}).macs
    return export_mod.topk_accuracy(logits, data["y_test"], 1), macs


def latency_speedup(before: Path, after: Path, sample: np.ndarray, threads: int) -> float:
    def name(p: Path) -> str:
        m = onnx.load(str(p))
        return next(
            i.name for i in m.graph.input if i.name not in {t.name for t in m.graph.initializer}
        )

    a, b = export_mod.interleaved_latency(
        before.read_bytes(),
        after.read_bytes(),
        name(before),
        name(after),
        sample[:32],
        32,
        runs=20,
        threads=threads,
    )
    return a.median_ms / b.median_ms


# ------------------------------------------------------------------ Torch-Pruning, by hand


def _attention_layers(model: nn.Module) -> dict[nn.Module, int]:
    """What a Torch-Pruning user writes by hand: the qkv/q/k/v Linear → num_heads map."""
    heads: dict[nn.Module, int] = {}
    for m in model.modules():
        if isinstance(m, tfkit.TimmAttention):
            heads[m.qkv] = m.heads
        elif isinstance(m, tfkit.BertSelfAttention):
            heads.update({m.query: m.heads, m.key: m.heads, m.value: m.heads})
        elif isinstance(m, nn.MultiheadAttention):
            heads[m] = m.num_heads
    return heads


def _patch_after_pruning(model: nn.Module, pruner) -> list[int]:
    """...and the attributes a Torch-Pruning user must patch after pruning."""
    kept = []
    for m in model.modules():
        if isinstance(m, tfkit.TimmAttention):
            m.heads = pruner.num_heads[m.qkv]
            kept.append(m.heads)
        elif isinstance(m, tfkit.BertSelfAttention):
            m.heads = pruner.num_heads[m.query]
            m.head_dim = m.query.out_features // m.heads
            kept.append(m.heads)
        elif isinstance(m, nn.MultiheadAttention):
            kept.append(m.num_heads)
    return kept


def torch_pruning_direct(
    model: nn.Module, example: torch.Tensor, target: float, heads_only_ratio: float = 0.5
):
    import torch_pruning as tp

    base = tp.utils.count_ops_and_params(model, example)[0]
    best = None
    for ratio in (0.2, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6):
        m = copy.deepcopy(model)
        heads = _attention_layers(m)
        ignored = [
            mod for mod in m.modules() if isinstance(mod, nn.Linear) and mod.out_features in (4, 10)
        ]
        pruner = tp.pruner.MetaPruner(
            m,
            example,
            importance=tp.importance.GroupMagnitudeImportance(p=1),
            pruning_ratio=ratio,
            num_heads=heads,
            prune_num_heads=True,
            prune_head_dims=False,
            head_pruning_ratio=heads_only_ratio,
            ignored_layers=ignored,
            global_pruning=False,
        )
        pruner.step()
        kept = _patch_after_pruning(m, pruner)
        with torch.no_grad():
            m(example)
        frac = tp.utils.count_ops_and_params(m, example)[0] / base
        if best is None or abs(frac - target) < abs(best[1] - target):
            best = (m, frac, kept)
    return best


# ------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs after pruning")
    ap.add_argument("--pretrain", type=int, default=8, help="training epochs before pruning")
    ap.add_argument("--target", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cases = [
        ("timm-style ViT", tfkit.TimmViT, "image"),
        ("torchvision ViT", tfkit.torchvision_vit, "image"),
        ("nn.TransformerEncoder", tfkit.TextEncoder, "tokens"),
        ("BERT layout", tfkit.BertClassifier, "tokens"),
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for label, build, kind in cases:
            torch.manual_seed(0)
            data = digits_images() if kind == "image" else tokens()
            npz = root / f"{kind}.npz"
            np.savez(npz, **data)
            model = build() if kind == "tokens" else build(num_classes=10)
            t0 = time.perf_counter()
            train(model, data, args.pretrain)
            example = torch.from_numpy(data["x_train"][:2])
            original = tfkit.export(
                model, example, root / f"{label}.onnx".replace(" ", "_"), "legacy"
            )
            acc0, macs0 = onnx_metrics(original, data)
            # Prunery: from the ONNX file only.
            spec = JobSpec(
                method={"name": "l1_norm"},
                target={"flops": args.target},
                recovery={"mode": "finetune", "epochs": args.epochs, "lr": 1e-3, "batch_size": 64},
            )
            out = root / f"out_{len(rows)}"
            report = run(
                spec,
                original,
                npz,
                out,
                latency_runs=10,
                latency_threads=args.threads,
                catalog=registry,
            )
            heads = [
                f"{r.channels_before}→{r.channels_after}"
                for r in report.layers
                if r.op == "attention heads"
            ]
            acc1, macs1 = onnx_metrics(out / "model.onnx", data)
            speed = latency_speedup(original, out / "model.onnx", data["x_test"], args.threads)
            rows.append(
                (
                    label,
                    "Prunery (ONNX, automatic)",
                    macs1 / macs0,
                    " ".join(heads),
                    acc0,
                    acc1,
                    speed,
                )
            )
            # Torch-Pruning on the same torch module, num_heads by hand.
            try:
                pruned, _, kept = torch_pruning_direct(copy.deepcopy(model), example, args.target)
                train(pruned, data, args.epochs)
                tp_path = tfkit.export(pruned, example, root / f"tp_{len(rows)}.onnx", "legacy")
                acc2, macs2 = onnx_metrics(tp_path, data)
                speed2 = latency_speedup(original, tp_path, data["x_test"], args.threads)
                rows.append(
                    (
                        label,
                        "Torch-Pruning (num_heads by hand)",
                        macs2 / macs0,
                        " ".join(str(k) for k in kept),
                        acc0,
                        acc2,
                        speed2,
                    )
                )
            except Exception as exc:  # report, do not hide
                msg = str(exc).strip().splitlines()[0][:70] if str(exc).strip() else ""
                rows.append(
                    (
                        label,
                        f"Torch-Pruning: fails ({type(exc).__name__}: {msg})",
                        float("nan"),
                        "",
                        acc0,
                        float("nan"),
                        float("nan"),
                    )
                )
            print(f"[{label}: {time.perf_counter() - t0:.0f}s]", file=sys.stderr)
    print(
        f"\nTarget {args.target} of the MACs; {args.epochs} fine-tuning epochs; latency at batch 32, onnxruntime CPU, {args.threads} threads\n"
    )
    print(
        "| model | tool | MACs kept | heads kept per block | acc before | acc after | drop (pts) | speedup |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for label, tool, kept, heads, a0, a1, sp in rows:
        print(
            f"| {label} | {tool} | {kept:.3f} | {heads} | {a0:.3f} | {a1:.3f} | {100 * (a0 - a1):.1f} | {sp:.2f}x |"
        )


if __name__ == "__main__":
    main()
