"""Benchmark: accuracy by default (issue 14) — old default vs new default vs auto vs each
method vs Torch-Pruning by hand, at the same budget and the same recovery epochs.

    .venv/bin/python benchmarks/accuracy.py [--models a,b] [--targets 0.5,0.25] [--epochs 3]
        [--configs old,new,auto,...] [--threads 1]

For every zoo model (sklearn digits, opset 17) and MACs target, each configuration runs the
engine's own stages — load and analyse once per model, then the method through
`progressive.run` (as the pipeline calls it), the recovery with the spec's distillation (as
the pipeline does it), the ONNX export with its parity check — and measures test accuracy
on the exported ONNX with onnxruntime (the only time the test split is read). Recovery:
`--epochs` epochs, Adam lr 1e-3, cosine, batch 64, for every configuration.

Configurations (`--configs`, default all):

* old      — l1_norm with the raw group sum of the group's own filters (normalizer none,
             inputs false), no distillation: the engine's default before issue 14.
* l1       — l1_norm with its new defaults (layer-normalised), with distillation.
* auto     — the new default job: method auto (candidates screened on a validation split
             carved from the training data), with distillation.
* l1-steps — l1 with schedule.steps = 3 (progressive; same total epochs).
* taylor, channel_regression, thinet, random, network_slimming — each method with its
             defaults and distillation.
* tp       — Torch-Pruning used by hand: BasePruner + MagnitudeImportance(p=1) (its group
             L1, mean-normalised), the same epochs on the labels.
* Extra l1 variants for choosing defaults: `l1:NORMALIZER:REDUCTION[:inputs]`, e.g.
  l1:mean:sum or l1:none:sum:inputs, and modifiers `+nokd`, `+a0.5`, `+T2`, `+steps3`,
  `+key=value` (a method parameter) on any configuration.

Prints one Markdown table (accuracy drop in points, MACs kept on the exported ONNX, wall
seconds), a summary per configuration and target (mean and worst drop over the models), and
writes benchmarks/out/accuracy.md. Never asserts.
"""

from __future__ import annotations

import argparse
import copy
import os
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.engine import _classifier_names, _quiet, _short_error, search_ratio  # noqa: E402
from benchmarks.methods import Prepared, prepare  # noqa: E402
from prunery.spec import JobSpec  # noqa: E402
from tests.zoo import ZOO, build_zoo_model, default_cache_dir, write_digits_npz  # noqa: E402
from workers.engine import export as export_mod  # noqa: E402
from workers.engine import load as load_mod  # noqa: E402
from workers.engine import progressive, recovery, train  # noqa: E402
from workers.engine.flops import onnx_costs, torch_costs  # noqa: E402
from workers.engine.method import PruneContext  # noqa: E402
from workers.engine.pipeline import _dynamic_batch, _instantiate  # noqa: E402

SEED = 0
RECOVERY = {"lr": 1e-3, "batch_size": 64, "optimizer": "adam", "schedule": "cosine"}
CONFIGS = ("old", "l1", "auto", "l1-steps", "taylor", "channel_regression", "thinet", "random", "network_slimming", "tp")


@dataclass
class Config:
    label: str
    method: str
    params: dict
    distill: dict = field(default_factory=dict)  # the spec's recovery.distill
    steps: int = 1


def config(label: str, epochs: int) -> Config:
    """A configuration label: a base (see the module docstring) and optional modifiers
    `+nokd`, `+kd`, `+a0.5` (distillation alpha), `+T2` (temperature), `+steps3`, and method
    parameters `+key=value` (e.g. `taylor+allocation=global`)."""
    base, *mods = label.split("+")
    if base == "old":
        cfg = Config(label, "l1_norm", {"normalizer": "none", "group_reduction": "sum", "inputs": False}, {"enabled": False})
    elif base == "l1":
        cfg = Config(label, "l1_norm", {})
    elif base == "l1-steps":
        cfg = Config(label, "l1_norm", {}, steps=3)
    elif base.startswith("l1:"):
        parts = base.split(":")[1:]
        params = {"normalizer": parts[0], "group_reduction": parts[1] if len(parts) > 1 else "sum", "inputs": "inputs" in parts}
        cfg = Config(label, "l1_norm", params)
    elif base == "network_slimming":
        cfg = Config(label, base, {"sparsity_epochs": epochs})
    else:
        cfg = Config(label, base, {})
    for mod in mods:
        if "=" in mod:  # a method parameter, e.g. +allocation=global
            key, value = mod.split("=", 1)
            cfg.params[key] = float(value) if value.replace(".", "", 1).isdigit() else value
        elif mod == "nokd":
            cfg.distill["enabled"] = False
        elif mod == "kd":
            cfg.distill["enabled"] = True
        elif mod.startswith("steps"):
            cfg.steps = int(mod[5:])
        elif mod.startswith("a"):
            cfg.distill["alpha"] = float(mod[1:])
        elif mod.startswith("T"):
            cfg.distill["temperature"] = float(mod[1:])
        else:
            raise SystemExit(f"unknown modifier {mod!r} in {label!r}")
    return cfg


@dataclass
class Row:
    model: str
    target: float
    config: str
    macs_kept: float | None = None
    acc_before: float | None = None
    acc_after: float | None = None
    drop: float | None = None
    wall: float | None = None
    note: str = ""


def spec_for(cfg: Config, target: float, epochs: int) -> JobSpec:
    return JobSpec(
        method={"name": cfg.method, "params": cfg.params}, target={"flops": target},
        recovery={"mode": "finetune", "epochs": epochs, **RECOVERY, "distill": cfg.distill},
        schedule={"steps": cfg.steps}, seed=SEED,
    )


def measure(row: Row, prep: Prepared, model: torch.nn.Module) -> None:
    """The pipeline's export + verify stages (accuracy and MACs only, no latency)."""
    name = prep.loaded.input_name
    onnx_model = export_mod.export_onnx(model, prep.example, 17, input_name=name)
    pruned_bytes = onnx_model.SerializeToString()
    _, rel = load_mod.parity(model, load_mod.ort_session(pruned_bytes), name, prep.data.x_test[:64].numpy())
    if not rel <= load_mod.PARITY_RTOL:
        row.note = f"parity {rel:.1e}"
    x, y = prep.data.x_test.numpy(), prep.data.y_test.numpy()
    feed = {name: x[:1]}
    row.macs_kept = onnx_costs(onnx_model, feed).macs / onnx_costs(_dynamic_batch(prep.loaded.onnx_model), feed).macs
    row.acc_before = prep.acc_before
    row.acc_after = export_mod.topk_accuracy(export_mod.onnx_predict(pruned_bytes, name, x), y, 1)
    row.drop = (row.acc_before - row.acc_after) * 100.0


def bench_engine(name: str, prep: Prepared, cfg: Config, target: float, epochs: int) -> Row:
    """What `workers.engine.run` does between analyse and export, for one configuration."""
    row = Row(name, target, cfg.label)
    t0 = time.perf_counter()
    try:
        spec = spec_for(cfg, target, epochs)
        torch.manual_seed(SEED)
        info, _, impl = _instantiate(spec)
        dev = torch.device("cpu")
        ctx = PruneContext(
            spec=spec, model=prep.loaded.module, example=prep.example, calibration=prep.calibration,
            data=prep.data, analysis=prep.analysis, base_costs=torch_costs(prep.loaded.module, prep.example),
            device=dev, seed=SEED, progress=lambda f, m: None,
        )
        result = progressive.run(impl, ctx, info.name)
        pruned = result.model.cpu().eval()
        remaining = spec.recovery.epochs if result.recovery_epochs is None else result.recovery_epochs
        kd = recovery.distillation(spec, result.distill)
        extra = recovery.combine(recovery.distill_loss(prep.loaded.module, kd, dev), result.recovery_extra_loss)
        if result.recovery == "scratch":
            train.reinitialize(pruned, SEED)
        recovery.train_epochs(ctx, pruned, remaining, lr=spec.recovery.lr, extra_loss=extra)
        measure(row, prep, pruned.cpu().eval())
        auto = result.details.get("auto")
        if auto:
            row.note = (row.note + " " if row.note else "") + f"won: {auto['winner']}"
    except Exception as exc:  # a failed configuration is a result too
        row.note = _short_error(exc)
    row.wall = time.perf_counter() - t0
    return row


def bench_tp(name: str, prep: Prepared, target: float, epochs: int) -> Row:
    """Torch-Pruning by hand: MagnitudeImportance(p=1), uniform ratio bisected to the budget."""
    row = Row(name, target, "tp")
    t0 = time.perf_counter()
    try:
        module = copy.deepcopy(prep.loaded.module)
        with torch.no_grad():
            num_classes = int(module(prep.example).shape[1])
        pruned, _ = search_ratio(module, prep.example, target, _classifier_names(module, num_classes))
        with torch.no_grad():
            pruned(prep.data.x_test[:4])
        train.train(pruned, prep.data, epochs=epochs, seed=SEED, device=torch.device("cpu"), **RECOVERY)
        measure(row, prep, pruned.cpu().eval())
    except Exception as exc:
        row.note = "tp failed: " + _short_error(exc)
    row.wall = time.perf_counter() - t0
    return row


# ------------------------------------------------------------------ output


def _f(v: float | None, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def render(rows: list[Row]) -> str:
    head = [
        "| model | target | config | MACs kept | acc before | acc after | drop (pts) | wall s | note |",
        "|---|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    body = [
        f"| {r.model} | {r.target} | {r.config} | {_f(r.macs_kept, '.3f')} | {_f(r.acc_before, '.4f')} "
        f"| {_f(r.acc_after, '.4f')} | {_f(r.drop, '.2f')} | {_f(r.wall, '.1f')} | {r.note} |"
        for r in rows
    ]
    return "\n".join(head + body)


def summary(rows: list[Row]) -> str:
    lines = [
        "| target | config | models | mean drop (pts) | worst drop (pts) | mean MACs kept | mean wall s |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    keys = list(dict.fromkeys((r.target, r.config) for r in rows))
    for t, c in sorted(keys, key=lambda k: -k[0]):
        mine = [r for r in rows if (r.target, r.config) == (t, c)]
        done = [r for r in mine if r.drop is not None]
        drops = [r.drop for r in done]
        lines.append(
            f"| {t} | {c} | {len(done)}/{len(mine)} | {_f(statistics.mean(drops) if drops else None, '.2f')} "
            f"| {_f(max(drops) if drops else None, '.2f')} "
            f"| {_f(statistics.mean(r.macs_kept for r in done) if done else None, '.3f')} "
            f"| {_f(statistics.mean(r.wall for r in mine if r.wall is not None) if mine else None, '.1f')} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(ZOO), help="comma-separated zoo names (default: all)")
    p.add_argument("--targets", default="0.5,0.25", help="MACs fractions to keep")
    p.add_argument("--epochs", type=int, default=3, help="recovery epochs, the same for every configuration")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"default {','.join(CONFIGS)}")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out")
    args = p.parse_args(argv)
    args.targets = [float(t) for t in args.targets.split(",")]
    args.configs = args.configs.split(",")
    bad = [m for m in args.models.split(",") if m not in ZOO]
    if bad:
        p.error(f"unknown models {bad}; zoo: {list(ZOO)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    _quiet()
    torch.set_num_threads(args.threads)
    command = "command: " + shlex.join([sys.executable, *sys.argv])
    print(command)
    print(f"torch {torch.__version__}, {os.cpu_count()} cpus, {args.threads} torch thread(s), targets {args.targets}, "
          f"recovery {args.epochs} epoch(s)", flush=True)
    rows: list[Row] = []
    t_start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)

    def dump(final: bool = False) -> tuple[str, str]:
        table, summ = render(rows), summary(rows)
        status = "" if final else "(partial: still running)\n\n"
        (args.out / "accuracy.md").write_text(f"{command}\n\n{status}{table}\n\n{summ}\n")
        return table, summ

    with tempfile.TemporaryDirectory() as tmp:
        data_path = write_digits_npz(Path(tmp) / "digits.npz")
        for name in args.models.split(","):
            model_path, _ = build_zoo_model(name, default_cache_dir(), opset=17)
            try:
                prep = prepare(model_path, data_path)
            except Exception as exc:
                rows.append(Row(name, 0.0, "(all)", note=_short_error(exc)))
                continue
            for target in args.targets:
                for label in args.configs:
                    if label == "tp":
                        row = bench_tp(name, prep, target, args.epochs)
                    else:
                        row = bench_engine(name, prep, config(label, args.epochs), target, args.epochs)
                    rows.append(row)
                    print(f"  {name} {target} {label}: drop {_f(row.drop, '.2f')} kept {_f(row.macs_kept, '.3f')} "
                          f"{row.wall:.1f}s {row.note}", file=sys.stderr, flush=True)
                    dump()
    table, summ = dump(final=True)
    print()
    print(table)
    print()
    print(summ)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    print(f"wrote {args.out / 'accuracy.md'}")


if __name__ == "__main__":
    main()
