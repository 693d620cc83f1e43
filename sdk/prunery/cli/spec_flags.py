"""The job-spec flags of `prunery prune` (local) and `prunery submit` (remote): one set of
flags, one function from flags to a JobSpec body. Flags that are not given leave the spec's
(or the --spec file's) value alone; the defaults are JobSpec's."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from prunery.spec import JobSpec


class SpecError(ValueError):
    """The flags do not make a valid job spec (the message says what to fix)."""


def add_spec_flags(p: argparse.ArgumentParser) -> None:
    """Everything that shapes the job (not where the model and data come from)."""
    p.add_argument(
        "--method",
        default=None,
        help="pruning method (see `prunery methods`); default auto (tries candidates on a validation split)",
    )
    p.add_argument(
        "--param",
        "--method-param",
        dest="param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a method parameter (VALUE parsed as JSON when it can be); repeatable",
    )
    p.add_argument(
        "--task",
        choices=["classification", "language_modeling"],
        help="default: classification (or the --spec's)",
    )
    tgt = p.add_mutually_exclusive_group()
    sweep = "; a comma-separated list (e.g. 0.75,0.5,0.25) is a budget sweep: one model per point"
    tgt.add_argument("--target-flops", type=str, help="fraction of MACs to keep, e.g. 0.5" + sweep)
    tgt.add_argument("--target-params", type=str, help="fraction of parameters to keep" + sweep)
    tgt.add_argument("--target-layers", type=str, help='JSON {"layer": ratio to remove, ...}')
    tgt.add_argument(
        "--target-latency",
        type=str,
        help="fraction of the original's measured latency to keep, e.g. 0.5" + sweep,
    )
    p.add_argument(
        "--latency-batch",
        type=int,
        help="batch size at which --target-latency is measured (default 1)",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        help="allowed |achieved - target| (default 0.01; latency: 5%% of the target)",
    )
    _recovery_flags(p)
    _export_and_gate_flags(p)
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--spec", type=Path, help="a JSON job spec; the flags above override its fields")


def _recovery_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=int, help="recovery epochs (default 3)")
    p.add_argument(
        "--lr",
        type=float,
        help="recovery learning rate (default: chosen among recovery.lr_choices on a validation split)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        help="training batch size (default: 64, halved down to 16 while an epoch of the training split would be under 40 steps)",
    )
    p.add_argument("--optimizer", choices=["sgd", "adam", "adamw"], help="default adam")
    p.add_argument(
        "--no-distill",
        action="store_true",
        help="recover on the labels only (default: distil from the original model)",
    )
    p.add_argument(
        "--steps",
        type=int,
        help="progressive pruning: reach the target in this many steps (default 1)",
    )
    p.add_argument(
        "--recovery",
        choices=["finetune", "scratch", "none"],
        help="recovery mode (default finetune)",
    )
    p.add_argument(
        "--scratch-epochs",
        choices=["E", "B"],
        help="Scratch-E or Scratch-B (epochs x MACs_full/MACs_pruned); default E",
    )


def _export_and_gate_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--round-to",
        type=int,
        help="keep channel counts a multiple of this (default: chosen per layer by timing it on onnxruntime)",
    )
    p.add_argument("--opset", type=int, help="opset of the exported model (default 17)")
    p.add_argument(
        "--max-accuracy-drop", type=float, help="gate: largest allowed top-1 drop in points"
    )
    p.add_argument(
        "--min-speedup",
        type=str,
        help="gate: smallest measured speedup at every batch size (default 1.0; 'null' disables)",
    )


def parse_param(text: str) -> tuple[str, Any]:
    """`KEY=VALUE`; VALUE is parsed as JSON when it can be, else kept as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise SpecError(f"--param {text!r}: use KEY=VALUE")
    try:
        return key.strip(), json.loads(raw)
    except ValueError:
        return key.strip(), raw


def min_speedup(text: str) -> float | None:
    if text.strip().lower() in ("null", "none", "off"):
        return None
    try:
        return float(text)
    except ValueError:
        raise SpecError(
            f"--min-speedup {text!r}: give a number such as 1.0, or null to disable the gate"
        ) from None


def fractions(text: str, flag: str) -> float | list[float]:
    """`0.5` -> 0.5; `0.75,0.5,0.25` -> a budget sweep [0.75, 0.5, 0.25] (the spec checks
    the values: range, count, distinct)."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise SpecError(
            f"{flag} {text!r}: give a fraction such as 0.5, or a comma-separated budget sweep "
            "such as 0.75,0.5,0.25"
        ) from None
    return values[0] if len(values) == 1 else values


def target(args: argparse.Namespace, base: dict[str, Any]) -> dict[str, Any]:
    """The budget: the flag given, else the --spec's; with its tolerance and latency batch."""
    out = dict(base)
    if args.target_flops is not None:
        out = {"flops": fractions(args.target_flops, "--target-flops")}
    elif args.target_params is not None:
        out = {"params": fractions(args.target_params, "--target-params")}
    elif args.target_latency is not None:
        out = {"latency": fractions(args.target_latency, "--target-latency")}
    elif args.target_layers is not None:
        try:
            out = {"layers": json.loads(args.target_layers)}
        except json.JSONDecodeError as exc:
            raise SpecError(f"--target-layers is not JSON: {exc}") from None
    if not out:
        raise SpecError(
            "give a budget: --target-flops 0.5, --target-params 0.5, --target-latency 0.5 "
            "or --target-layers '{...}'"
        )
    if args.tolerance is not None:
        out["tolerance"] = args.tolerance
    if args.latency_batch is not None:
        out["latency_batch"] = args.latency_batch
    return out


def _read_spec(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        body = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SpecError(f"cannot read --spec {path}: {exc}") from None
    if not isinstance(body, dict):
        raise SpecError(f"--spec {path}: a JSON object is needed")
    return body


def _given(pairs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in pairs.items() if v is not None}


def spec_body(args: argparse.Namespace) -> dict[str, Any]:
    """The job spec (a JSON body) from the flags over the --spec file."""
    body = _read_spec(args.spec)
    method = body.get("method", {})
    params = dict(method.get("params", {}))
    params.update(parse_param(p) for p in args.param)
    body["method"] = {"name": args.method or method.get("name") or "auto", "params": params}
    body["target"] = target(args, body.get("target", {}))
    rec = dict(body.get("recovery", {}))
    rec.update(
        _given(
            {
                "mode": args.recovery,
                "epochs": args.epochs,
                "lr": args.lr,
                "batch_size": args.batch_size,
                "optimizer": args.optimizer,
                "epochs_mode": args.scratch_epochs,
            }
        )
    )
    if args.no_distill:
        rec["distill"] = {**rec.get("distill", {}), "enabled": False}
    body["recovery"] = rec
    if args.steps is not None:
        body["schedule"] = {**body.get("schedule", {}), "steps": args.steps}
    body["export"] = {
        **body.get("export", {}),
        **_given({"opset": args.opset, "round_to": args.round_to}),
    }
    gates = dict(body.get("gates", {}))
    if args.max_accuracy_drop is not None:
        gates["max_accuracy_drop"] = args.max_accuracy_drop
    if args.min_speedup is not None:
        gates["min_speedup"] = min_speedup(args.min_speedup)
    body["gates"] = gates
    body.update(_given({"seed": args.seed, "task": args.task}))
    return body


def validate(body: dict[str, Any]) -> JobSpec:
    """The JobSpec, or a SpecError naming every problem."""
    try:
        return JobSpec.model_validate(body)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise SpecError(f"invalid job spec: {problems}") from None


def spec_from_args(args: argparse.Namespace) -> JobSpec:
    return validate(spec_body(args))
