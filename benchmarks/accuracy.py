"""Benchmark: accuracy by default (issue 14) — old default vs new default vs auto vs each
method vs Torch-Pruning by hand, at the same budget and the same recovery epochs.

    .venv/bin/python -m benchmarks.accuracy [--models a,b] [--targets 0.5,0.25] [--epochs 3]
        [--configs old,new,auto,...] [--threads 1] [--seed 0]

For every zoo model (sklearn digits, opset 17) and MACs target, each configuration runs the
engine's own stages — load and analyse once per model, then the prune stage as a job runs it
(the method through `progressive.run`, widths stepped by the measured latency profile, the
never-slower check and the whole-network width choice; the note gives each width set's
speedup at batch 1/32 and the one kept), the recovery with the spec's distillation (as
the pipeline does it), the ONNX export with its parity check — and measures test accuracy
on the exported ONNX with onnxruntime (the only time the test split is read). Recovery:
`--epochs` epochs, Adam, cosine, for every configuration; the learning rate and the batch
are the spec's defaults (lr chosen among recovery.lr_choices on a validation split carved from
the training data; batch from the training split's size, 32 on digits) except for `old` and
`tp`, which train at lr 1e-3 and batch 64 (the old defaults; `+fixedlr` does that for any
configuration).

Configurations (`--configs`, default all):

* old      — l1_norm with the raw group sum of the group's own filters (normalizer none,
             inputs false), no distillation, lr 1e-3: the engine's default before issue 14.
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
  recovery overrides `+lr3e-3` (a fixed lr), `+fixedlr` (1e-3), `+lrscreen3`
  (lr_screen_epochs), `+lrc1e-3|3e-3|1e-2` (lr_choices), `+bs32`, `+optsgd`, `+step1` (widths step by 1 and nothing is timed:
  the criterion without the width rounding; before session 13 every configuration ran so),
  `+key=value` (a method parameter; `a|b|c` for a list, e.g.
  `auto+candidates=l1_norm|channel_regression:allocation=global`) on any configuration.

Prints one Markdown table (accuracy drop in points, MACs kept on the exported ONNX, wall
seconds), a summary per configuration and target (mean and worst drop over the models), and
writes benchmarks/out/accuracy.md. Never asserts.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

import benchmarks.common as common
from benchmarks.common import (
    CHOSEN_LR,
    RECOVERY,
    Baseline,
    fmt,
    grid_parser,
    grouped,
    machine,
    markdown,
    measure,
    parse_grid,
    recover_copy,
    run_grid,
    run_method,
    short_error,
    unknown_models,
)
from benchmarks.engine import _classifier_names, search_ratio
from engine import train
from prunery.spec import JobSpec
from tests.zoo import ZOO

CONFIGS = (
    "old",
    "l1",
    "auto",
    "l1-steps",
    "taylor",
    "channel_regression",
    "thinet",
    "random",
    "network_slimming",
    "tp",
)


@dataclass
class Config:
    label: str
    method: str
    params: dict
    distill: dict = field(default_factory=dict)  # the spec's recovery.distill
    steps: int = 1
    recovery: dict = field(default_factory=dict)  # overrides of RECOVERY (lr, batch_size, ...)
    fixed_lr: bool = False  # lr 1e-3 (the old default) instead of the spec's chosen lr
    widths: bool = True  # the pipeline's prune stage: measured width steps, never-slower choice


def config(label: str, epochs: int) -> Config:
    """A configuration label: a base (see the module docstring) and optional modifiers
    `+nokd`, `+kd`, `+a0.5` (distillation alpha), `+T2` (temperature), `+steps3`, recovery
    overrides `+lr3e-3`, `+bs32`, `+optsgd`, and method
    parameters `+key=value` (e.g. `taylor+allocation=global`)."""
    base, *mods = label.split("+")
    if base == "old":
        cfg = Config(
            label,
            "l1_norm",
            {"normalizer": "none", "group_reduction": "sum", "inputs": False},
            {"enabled": False},
            fixed_lr=True,
        )
    elif base == "l1":
        cfg = Config(label, "l1_norm", {})
    elif base == "l1-steps":
        cfg = Config(label, "l1_norm", {}, steps=3)
    elif base.startswith("l1:"):
        parts = base.split(":")[1:]
        params = {
            "normalizer": parts[0],
            "group_reduction": parts[1] if len(parts) > 1 else "sum",
            "inputs": "inputs" in parts,
        }
        cfg = Config(label, "l1_norm", params)
    elif base == "network_slimming":
        cfg = Config(label, base, {"sparsity_epochs": epochs})
    else:
        cfg = Config(label, base, {})
    for mod in mods:
        if "=" in mod:  # a method parameter, e.g. +allocation=global
            key, value = mod.split("=", 1)
            if "|" in value:  # a list, e.g. +candidates=l1_norm|channel_regression
                cfg.params[key] = value.split("|")
            else:
                cfg.params[key] = float(value) if value.replace(".", "", 1).isdigit() else value
        elif mod.startswith("lrc"):  # recovery.lr_choices, e.g. +lrc1e-3|3e-3|1e-2
            cfg.recovery["lr_choices"] = [float(v) for v in mod[3:].split("|")]
        elif mod.startswith("lrscreen"):
            cfg.recovery["lr_screen_epochs"] = float(mod[8:])
        elif mod == "fixedlr":
            cfg.fixed_lr = True
        elif mod == "step1":
            cfg.widths = False
        elif mod == "nokd":
            cfg.distill["enabled"] = False
        elif mod == "kd":
            cfg.distill["enabled"] = True
        elif mod.startswith("steps"):
            cfg.steps = int(mod[5:])
        elif mod.startswith("lr"):
            cfg.recovery["lr"] = float(mod[2:])
        elif mod.startswith("bs"):
            cfg.recovery["batch_size"] = int(mod[2:])
        elif mod.startswith("opt"):
            cfg.recovery["optimizer"] = mod[3:]
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
        method={"name": cfg.method, "params": cfg.params},
        target={"flops": target},
        recovery={
            "mode": "finetune",
            "epochs": epochs,
            **(RECOVERY if cfg.fixed_lr else CHOSEN_LR),
            **cfg.recovery,
            "distill": cfg.distill,
        },
        schedule={"steps": cfg.steps},
        seed=common.SEED,
    )


def bench_engine(name: str, base: Baseline, cfg: Config, target: float, epochs: int) -> Row:
    """What `engine.run` does between analyse and export, for one configuration: the method
    through `progressive.run`, the recover stage (with the spec's distillation), then the
    export and verify stages (accuracy and MACs only, no latency)."""
    row = Row(name, target, cfg.label)
    t0 = time.perf_counter()
    try:
        spec = spec_for(cfg, target, epochs)
        pruned = run_method(base, spec, widths=cfg.widths)
        recovered = recover_copy(base, pruned, spec)
        measure(row, base, recovered.model)
        if recovered.lr_choice:
            row.note = (
                f"lr {recovered.lr:g} ("
                + ", ".join(
                    f"{r['lr']:g}: {r.get('val_accuracy', 'diverged')}"
                    for r in recovered.lr_choice["table"]
                )
                + ")"
            )
        auto = pruned.result.details.get("auto")
        if auto:
            row.note = (row.note + " " if row.note else "") + f"won: {auto['winner']}"
        if pruned.speed_checks:
            row.note = (row.note + " " if row.note else "") + widths_note(pruned.speed_checks)
    except Exception as exc:  # a failed configuration is a result too
        row.note = short_error(exc)
    row.wall = time.perf_counter() - t0
    return row


def widths_note(checks: dict) -> str:
    """The prune stage's whole-network timings (speedup at batch 1/32 before recovery, per
    width set tried, and a candidate's speedup over the kept set timed head to head) and the
    set it kept."""
    tried = ", ".join(
        f"{c['widths']} "
        + (
            "/".join(f"{v:.2f}" for v in c["speedup"].values()) + "x"
            if "speedup" in c
            else "failed"
        )
        + (
            " (head to head " + "/".join(f"{v:.2f}" for v in c["vs_kept"].values()) + "x)"
            if "vs_kept" in c
            else ""
        )
        for c in checks.get("checks", [])
    )
    return f"widths {tried} -> {checks.get('kept', 'first')}"


def bench_tp(name: str, base: Baseline, target: float, epochs: int) -> Row:
    """Torch-Pruning by hand: MagnitudeImportance(p=1), uniform ratio bisected to the budget."""
    row = Row(name, target, "tp")
    t0 = time.perf_counter()
    try:
        prep = base.prep
        module = copy.deepcopy(prep.module)
        with torch.no_grad():
            num_classes = int(module(prep.example).shape[1])
        pruned, _ = search_ratio(
            module, prep.example, target, _classifier_names(module, num_classes)
        )
        with torch.no_grad():
            pruned(prep.data.x_test[:4])
        train.train(
            pruned,
            prep.data,
            epochs=epochs,
            seed=common.SEED,
            device=torch.device("cpu"),
            **RECOVERY,
        )
        measure(row, base, pruned.cpu().eval())
    except Exception as exc:
        row.note = "tp failed: " + short_error(exc)
    row.wall = time.perf_counter() - t0
    return row


# ------------------------------------------------------------------ output


def render(rows: list[Row]) -> str:
    return markdown(
        "| model | target | config | MACs kept | acc before | acc after | drop (pts) | wall s | note |",
        "|---|---:|---|---:|---:|---:|---:|---:|---|",
        rows,
        lambda r: (
            f"| {r.model} | {r.target} | {r.config} | {fmt(r.macs_kept, '.3f')} | {fmt(r.acc_before, '.4f')} "
            f"| {fmt(r.acc_after, '.4f')} | {fmt(r.drop, '.2f')} | {fmt(r.wall, '.1f')} | {r.note} |"
        ),
    )


def summary(rows: list[Row]) -> str:
    lines = [
        "| target | config | models | mean drop (pts) | worst drop (pts) | mean MACs kept | mean wall s |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    by = grouped(
        rows, lambda r: (r.target, r.config), lambda r: r.drop is not None, lambda k: -k[0]
    )
    for (t, c), mine, done in by:
        drops = [r.drop for r in done]
        lines.append(
            f"| {t} | {c} | {len(done)}/{len(mine)} | {fmt(statistics.mean(drops) if drops else None, '.2f')} "
            f"| {fmt(max(drops) if drops else None, '.2f')} "
            f"| {fmt(statistics.mean(r.macs_kept for r in done) if done else None, '.3f')} "
            f"| {fmt(statistics.mean(r.wall for r in mine if r.wall is not None) if mine else None, '.1f')} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    def own(p: argparse.ArgumentParser) -> None:
        p.add_argument("--configs", default=",".join(CONFIGS), help=f"default {','.join(CONFIGS)}")
        p.add_argument(
            "--threads", type=int, default=1, help="torch threads (the machine is shared)"
        )
        p.add_argument(
            "--seed",
            type=int,
            default=0,
            help="the jobs' seed (validation split, calibration, recovery order); the zoo's "
            "trained models do not change. Runs at several seeds show a cell's spread",
        )

    p = grid_parser(__doc__, 3, "recovery epochs, the same for every configuration", own)
    args = parse_grid(p, argv)
    args.configs = args.configs.split(",")
    if bad := unknown_models(args):
        p.error(f"unknown models {bad}; zoo: {list(ZOO)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    common.SEED = args.seed

    def cells(name: str, _m: Path, _d: Path, base: Baseline, target: float) -> Iterator[list[Row]]:
        for label in args.configs:
            if label == "tp":
                row = bench_tp(name, base, target, args.epochs)
            else:
                row = bench_engine(name, base, config(label, args.epochs), target, args.epochs)
            print(
                f"  {name} {target} {label}: drop {fmt(row.drop, '.2f')} kept {fmt(row.macs_kept, '.3f')} "
                f"{row.wall:.1f}s {row.note}",
                file=sys.stderr,
                flush=True,
            )
            yield [row]

    run_grid(
        args,
        f"{machine()}, {args.threads} torch thread(s), targets {args.targets}, "
        f"recovery {args.epochs} epoch(s), seed {args.seed}",
        "accuracy.md",
        lambda rows: (render(rows), summary(rows)),
        lambda name, error: Row(name, 0.0, "(all)", note=error),
        cells,
    )
    print(f"wrote {args.out / 'accuracy.md'}")


if __name__ == "__main__":
    main()
