"""Analyse before pruning: which channel groups can go, what they cost, how far a budget can
reach and which methods apply — the `load` and `analyse` stages of the pipeline only, so it
takes seconds, not a training run.

    prunery analyze MODEL.onnx [--data DATA.npz] [--round-to 8] [--json] [--out analysis.json]

`summarize()` turns the pipeline's own `graph.Analysis` into the `prunery.analysis.Analysis`
that every job also writes as `analysis.json` (before it prunes, so a job that fails with
`budget_unreachable` still has it).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from prunery.analysis import (
    Analysis,
    ExcludedGroup,
    GroupLayer,
    MethodApplicability,
    PrunableGroup,
    render_text,
)
from workers import checks
from workers.engine import graph
from workers.engine.budget import _chunks_for_group
from workers.engine.flops import torch_costs
from workers.errors import BadSpec, EngineError
from workers.methods import catalog

MAX_LAYER_RATIO = 0.9  # the budget allocator's default: no group loses more than 90%


def _own_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=False))


def methods_for(summary: checks.ModelSummary, task: str) -> list[MethodApplicability]:
    out = []
    for info in catalog.list_methods():
        try:
            catalog.check_applicable(info.name, summary, task)
            out.append(MethodApplicability(name=info.name, applies=True))
        except EngineError as exc:
            out.append(MethodApplicability(name=info.name, applies=False, reason=exc.message))
    return out


def summarize(
    module: nn.Module,
    example: torch.Tensor,
    analysis: graph.Analysis,
    summary: checks.ModelSummary,
    task: str,
    round_to: int | None = 1,
    notes: list[str] | None = None,
) -> Analysis:
    """The public analysis of a converted model and its `graph.analyse` result."""
    notes = list(notes or [])
    base = torch_costs(module, example)
    modules = dict(module.named_modules())
    macs_total, params_total = max(base.macs, 1), max(base.params, 1)
    groups: list[PrunableGroup] = []
    plan: dict[str, list[int]] = {}
    touched: set[str] = set()
    for g in analysis.groups:
        removable = [i for chunk in _chunks_for_group(g, list(range(g.channels)), max(1, round_to or 1), MAX_LAYER_RATIO) for i in chunk]
        if removable:
            plan[g.name] = removable
        names = {m.name for m in g.members}
        touched |= names
        macs = sum(base.per_layer.get(n, 0) for n in names)
        params = sum(_own_params(modules[n]) for n in names if n in modules)
        groups.append(PrunableGroup(
            name=g.name, channels=g.channels, min_channels=g.channels - len(removable),
            layers=[GroupLayer(name=m.name, op=m.op, role=m.role) for m in g.members],
            macs=int(macs), params=int(params),
            macs_share=round(macs / macs_total, 6), params_share=round(params / params_total, 6),
        ))
    min_macs, min_params = 1.0, 1.0
    if plan:
        try:
            smallest = graph.prune_copy(module, example, plan)
            costs = torch_costs(smallest, example)
            min_macs, min_params = costs.macs / macs_total, costs.params / params_total
        except Exception as exc:  # the groups were proven one by one; say so if all together fail
            notes.append(f"pruning every group to its minimum at once failed ({type(exc).__name__}: {exc}); "
                         "the smallest reachable fractions are unknown")
    prunable_macs = sum(v for k, v in base.per_layer.items() if k in touched)
    if analysis.lifted:
        notes.append(f"{len(analysis.lifted)} MatMul+Add pairs were lifted into Linear layers so they can be pruned")
    return Analysis(
        task=task, input_shape=[int(d) for d in example.shape], macs=base.macs, params=base.params,
        round_to=round_to, groups=groups,
        excluded=[ExcludedGroup(name=n, reason=r) for n, r in analysis.excluded],
        prunable_macs_share=round(prunable_macs / macs_total, 6),
        min_macs_fraction=round(min_macs, 6), min_params_fraction=round(min_params, 6),
        methods=methods_for(summary, task), notes=notes,
    )


def analyze(
    model_path: Path | str,
    data_path: Path | str | None = None,
    *,
    task: str = "classification",
    round_to: int = 1,
    seed: int = 0,
    max_model_bytes: int = checks.DEFAULT_MAX_MODEL_BYTES,
    progress: Callable[[float], None] | None = None,
) -> Analysis:
    """Load (check, convert, prove the conversion) and analyse one model. Without data the
    sample shape comes from the model's declared input, and the probes use random inputs."""
    from workers import datasets
    from workers.engine import load

    t0 = time.perf_counter()
    if round_to < 1:
        raise BadSpec("round_to must be at least 1")
    model_path = Path(model_path)
    torch.manual_seed(seed)
    notes: list[str] = []
    vocab = None
    if data_path is not None:
        ds = datasets.load_dataset(data_path, task=task, seed=seed)
        sample_shape = tuple(ds.sample_shape)
        vocab = ds.vocab_size if task == "language_modeling" else None
        x = torch.as_tensor(ds.x_train)
        if x.is_floating_point():
            x = x.float()
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:16]
        calibration = x[idx]
    else:
        checked = checks.load_checked(model_path, max_bytes=max_model_bytes)
        inits = {t.name for t in checked.graph.initializer}
        inputs = [i for i in checked.graph.input if i.name not in inits]
        dims = checks._shape(inputs[0]) if len(inputs) == 1 else []
        sample = dims[1:]
        if len(inputs) == 1 and not all(isinstance(d, int) and d > 0 for d in sample):
            raise BadSpec(
                f"the model's input {inputs[0].name!r} has shape {dims}: the sample dimensions are not fixed, "
                "so pass --data (a dataset) to give the sample shape"
            )
        sample_shape = tuple(int(d) for d in sample)
        calibration = None
        notes.append("no dataset given: the zero-equivalence probes ran on random inputs")
    loaded = load.load(model_path, sample_shape, max_bytes=max_model_bytes, seed=seed, input_high=vocab)
    notes.extend(loaded.notes)
    if calibration is None:
        calibration = torch.from_numpy(load.random_input([16, *sample_shape], loaded.input_dtype, seed, vocab))
    example = calibration[:1].clone()
    result = graph.analyse(loaded.module, example, calibration, round_to=round_to, seed=seed, progress=progress)
    result.lifted = loaded.lifted
    summary = checks.summarize(loaded.onnx_model, loaded.file_bytes)
    out = summarize(loaded.module, example, result, summary, task, round_to, notes)
    out.seconds = round(time.perf_counter() - t0, 3)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prunery analyze",
        description="Show what can be pruned in an ONNX model (prunable groups, excluded layers with reasons, "
        "MAC/parameter shares, the smallest reachable budget, applicable methods) without pruning it.",
    )
    p.add_argument("model", type=Path, help="the model, an .onnx file")
    p.add_argument("--data", type=Path, help="a dataset (.npz or image-folder archive): its samples drive the probes")
    p.add_argument("--task", choices=["classification", "language_modeling"], default="classification")
    p.add_argument("--round-to", type=int, default=1, help="channel counts stay multiples of this (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the analysis as JSON")
    p.add_argument("--out", type=Path, help="also write the analysis JSON to this file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.model.is_file():
        print(f"prunery analyze: error: model file {str(args.model)!r} does not exist", file=sys.stderr)
        return 2
    if args.data is not None and not args.data.is_file():
        print(f"prunery analyze: error: dataset file {str(args.data)!r} does not exist", file=sys.stderr)
        return 2
    torch.set_num_threads(min(torch.get_num_threads(), 4))
    try:
        result = analyze(args.model, args.data, task=args.task, round_to=args.round_to, seed=args.seed)
    except EngineError as exc:
        print(f"prunery analyze: error: {exc.code}: {exc.message}", file=sys.stderr)
        return 2
    if args.out:
        args.out.write_text(result.model_dump_json(indent=2))
    print(result.model_dump_json(indent=2) if args.json else render_text(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

