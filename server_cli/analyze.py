"""`prunery analyze MODEL.onnx`: what can be pruned in a local model (no server), and an
estimate of a job's time for a spec (`--spec`, `--method`, `--epochs`, `--batch-size`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from prunery.cli.plugins import Command
from prunery.types import ExitCode

DESCRIPTION = (
    "Show what can be pruned in an ONNX model (prunable groups, excluded layers with reasons, "
    "MAC/parameter shares, the smallest reachable budget, applicable methods) without pruning it, "
    "and estimate a job's time from measured per-step costs (one training step, one evaluation "
    "batch, one export, onnxruntime forwards on this machine)."
)


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="the model, an .onnx file")
    p.add_argument(
        "--data",
        type=Path,
        help="a dataset (.npz or image-folder archive): its samples drive the probes",
    )
    p.add_argument(
        "--task", choices=["classification", "language_modeling"], default="classification"
    )
    p.add_argument(
        "--round-to", type=int, default=1, help="channel counts stay multiples of this (default 1)"
    )
    p.add_argument("--seed", type=int, default=0)
    est = p.add_argument_group("job-time estimate")
    est.add_argument(
        "--spec",
        type=Path,
        help="a job spec (JSON, as submitted) to estimate; default: the defaults",
    )
    est.add_argument("--method", help="the method to estimate (overrides the spec's)")
    est.add_argument("--epochs", type=int, help="recovery epochs (overrides the spec's)")
    est.add_argument("--batch-size", type=int, help="recovery batch size (overrides the spec's)")
    est.add_argument("--no-estimate", action="store_true", help="skip the job-time estimate")
    p.add_argument("--json", action="store_true", help="print the analysis as JSON")
    p.add_argument("--out", type=Path, help="also write the analysis JSON to this file")


def _fail(message: str) -> int:
    print(f"prunery analyze: error: {message}", file=sys.stderr)
    return ExitCode.BAD_INPUT


def estimate_spec(args: argparse.Namespace) -> Any:
    """The JobSpec to estimate: --spec (or the defaults) with the flags' overrides."""
    from engine.analysis import default_spec
    from prunery.spec import JobSpec

    base = (
        json.loads(args.spec.read_text())
        if args.spec
        else default_spec().model_dump(mode="json", exclude_none=True)
    )
    if args.method:
        base["method"] = {"name": args.method}
    recovery = dict(base.get("recovery") or {})
    if args.epochs is not None:
        recovery["epochs"] = args.epochs
    if args.batch_size is not None:
        recovery["batch_size"] = args.batch_size
    base["recovery"] = recovery
    base.setdefault("task", args.task)
    return JobSpec.model_validate(base)


def run(args: argparse.Namespace) -> int:
    if not args.model.is_file():
        return _fail(f"model file {str(args.model)!r} does not exist")
    if args.data is not None and not args.data.is_file():
        return _fail(f"dataset file {str(args.data)!r} does not exist")
    import torch
    from pydantic import ValidationError

    from core.errors import EngineError
    from engine.analysis import analyze
    from methods import registry
    from prunery.analysis import render_text

    torch.set_num_threads(min(torch.get_num_threads(), 4))
    try:
        spec = None if args.no_estimate else estimate_spec(args)
    except (OSError, ValueError, ValidationError) as exc:
        return _fail(f"the spec to estimate is not valid: {str(exc).splitlines()[0]}")
    if spec is not None and spec.method.name not in {m.name for m in registry.list_methods()}:
        return _fail(f"unknown method {spec.method.name!r} (prunery methods lists them)")
    try:
        result = analyze(
            args.model,
            args.data,
            task=args.task,
            round_to=args.round_to,
            seed=args.seed,
            catalog=registry,
            spec=spec,
            estimate=spec is not None,
        )
    except EngineError as exc:
        return _fail(f"{exc.code}: {exc.message}")
    if args.out:
        args.out.write_text(result.model_dump_json(indent=2))
    print(result.model_dump_json(indent=2) if args.json else render_text(result))
    return ExitCode.OK


COMMAND = Command(
    help="what can be pruned in a local MODEL.onnx (no server)",
    description=DESCRIPTION,
    configure=configure,
    run=run,
)


def main(argv: list[str] | None = None) -> int:
    return COMMAND.main("analyze", argv)


if __name__ == "__main__":
    sys.exit(main())
