"""What benchmarks/methods.py and benchmarks/accuracy.py share: a zoo model prepared by the
engine's own `prepare()`, each configuration's context from `Prepared.rebind()`, recovery by
`engine.stages.recover()` and the numbers by `engine.verify.export_and_verify()` — the same
stages `engine.run` uses, so the tables show what a job would report.

Run the benchmarks as modules from the repository root (`python -m benchmarks.methods`):
`tests.zoo` and `tests.engine.cnnkit` are then importable as packages, no path edits.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine import export as export_mod
from engine import progressive
from engine.pipeline import run
from engine.prepare import Prepared, dynamic_batch, prepare
from engine.stages import Pruned, Recovered, recover
from engine.stages import prune as prune_stage
from engine.verify import export_and_verify
from methods import registry
from prunery.report import Report
from prunery.spec import JobSpec
from tests.zoo import ZOO, build_zoo_model, default_cache_dir, write_digits_npz

SEED = 0
RECOVERY = {"lr": 1e-3, "batch_size": 64, "optimizer": "adam", "schedule": "cosine"}
# The spec's defaults: the learning rate (null: chosen on a validation split,
# recovery.lr_choices) and the batch size (null: from the training split's size).
CHOSEN_LR = {k: v for k, v in RECOVERY.items() if k not in ("lr", "batch_size")}
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Baseline:
    """One zoo model after the engine's load and analyse stages (shared by every config)."""

    prep: Prepared
    acc_before: float  # top-1 of the original ONNX on the test split (onnxruntime)


def prepare_model(model_path: Path, data_path: Path) -> Baseline:
    spec = JobSpec(method={"name": "l1_norm"}, target={"flops": 0.5}, seed=SEED)
    prep = prepare(spec, model_path, data_path, catalog=registry, device="cpu")
    name = prep.loaded.model.input_name
    base_bytes = dynamic_batch(prep.loaded.model.onnx_model).SerializeToString()
    logits = export_mod.onnx_predict(base_bytes, name, prep.data.x_test.numpy())
    acc = export_mod.topk_accuracy(logits, prep.data.y_test.numpy(), 1)
    return Baseline(prep, acc)


def run_method(base: Baseline, spec: JobSpec, *, widths: bool = False) -> Pruned:
    """The configuration's method through `progressive.run`, as the pipeline calls it.

    `widths`: the pipeline's whole prune stage (`engine.stages.prune`), i.e. what a job with
    this spec ships: channel widths stepped by the measured per-layer latency profile, the
    never-slower check and the whole-network choice between the measured and the coarse width
    set (the pruned model's `speed_checks` say which was kept). Without it the widths step by 1
    and nothing is timed, which isolates the criterion from the width rounding."""
    torch.manual_seed(SEED)
    prep = base.prep.rebind(spec, registry)
    if widths:
        return prune_stage(prep, lambda _f, _m: None)
    ctx = prep.context()
    result = progressive.run(prep.method, ctx, prep.info.name)
    model = result.model.cpu().eval()
    return Pruned(ctx, result, model, ctx.costs(model))


def recover_copy(base: Baseline, pruned: Pruned, spec: JobSpec) -> Recovered:
    """The pipeline's recover stage under `spec`'s recovery (fine-tune, Scratch-E or -B) on a
    copy of the pruned network, so one method run serves several recoveries."""
    import copy

    prep = base.prep.rebind(spec, registry)
    model = copy.deepcopy(pruned.model)
    mine = Pruned(prep.context(), pruned.result, model, pruned.costs)
    return recover(prep, mine, lambda f, m: None)


def measure(
    row: Any,
    base: Baseline,
    model: torch.nn.Module,
    *,
    batches: Sequence[int] = (),
    runs: int = 10,
    threads: int | None = None,
) -> None:
    """The pipeline's export and verify stages; fills the row's macs_kept, acc_before,
    acc_after, drop (and `speedup[batch]` when `batches` are timed)."""
    try:
        verified = export_and_verify(
            base.prep, model, latency_runs=runs, latency_threads=threads, batches=batches
        )
    except export_mod.ExportFailed as exc:
        row.note = str(exc)
        return
    row.macs_kept = verified.cost_after.macs / verified.cost_before.macs
    row.acc_before = base.acc_before
    assert verified.accuracy is not None  # classification
    row.acc_after = verified.accuracy.after
    row.drop = (row.acc_before - row.acc_after) * 100.0
    for lat in verified.latencies:
        row.speedup[lat.batch_size] = lat.before / lat.after


def zoo_models(names: Sequence[str]) -> Iterator[tuple[str, Path, Path]]:
    """(name, model path, digits data path) per zoo model (trained once, cached)."""
    with tempfile.TemporaryDirectory() as tmp:
        data_path = write_digits_npz(Path(tmp) / "digits.npz")
        for name in names:
            model_path, _ = build_zoo_model(name, default_cache_dir(), opset=17)
            yield name, model_path, data_path


def command_line() -> str:
    return "command: " + shlex.join([sys.executable, *sys.argv])


def write_tables(path: Path, command: str, table: str, summ: str, final: bool) -> None:
    """Rewritten after every row, so a run cut short still leaves its table."""
    status = "" if final else "(partial: still running)\n\n"
    path.write_text(f"{command}\n\n{status}{table}\n\n{summ}\n")


def fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def short_error(exc: BaseException) -> str:
    # The engine's messages put the fact first and the advice after a ';'.
    text = str(exc).splitlines()[0].split(";")[0] if str(exc) else ""
    text = f"{type(exc).__name__}: {text}"[:160]
    return text.replace("|", "/")  # keep the Markdown table intact


def quiet() -> None:
    # TorchScript export and tp's tracing warn per layer; the table is the output.
    warnings.filterwarnings("ignore")
    logging.getLogger("onnxslim").setLevel(logging.ERROR)


def markdown(head: str, align: str, rows: Iterable[Any], line: Callable[[Any], str]) -> str:
    """A Markdown table: the header row, the alignment row, then `line(row)` per row."""
    return "\n".join([head, align, *(line(r) for r in rows)])


def over(stat: Callable[[list[float]], float], rows: Iterable[Any], get: Callable) -> float | None:
    """`stat` (mean, median) of `get(row)` over the rows where it is known; None if none is."""
    vals = [v for v in (get(r) for r in rows) if v is not None]
    return stat(vals) if vals else None


# ------------------------------------------------------------------ command line and grid


def zoo_parser(doc: str | None) -> argparse.ArgumentParser:
    """The benchmarks' parser: the module docstring's first paragraph and `--models`."""
    assert doc is not None
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument(
        "--models", default=",".join(ZOO), help="comma-separated zoo names (default: all)"
    )
    return p


def grid_parser(
    doc: str | None, epochs: int, epochs_help: str, own: Callable[[argparse.ArgumentParser], None]
) -> argparse.ArgumentParser:
    """`--models --targets --epochs`, the script's `own` flags, then `--out`."""
    p = zoo_parser(doc)
    p.add_argument("--targets", default="0.5,0.25", help="MACs fractions to keep")
    p.add_argument("--epochs", type=int, default=epochs, help=epochs_help)
    own(p)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out")
    return p


def unknown_models(args: argparse.Namespace) -> list[str]:
    return [m for m in args.models.split(",") if m not in ZOO]


def parse_grid(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = p.parse_args(argv)
    args.targets = [float(t) for t in args.targets.split(",")]
    return args


def run_grid(
    args: argparse.Namespace,
    header: str,
    md_name: str,
    tables: Callable[[list[Any]], tuple[str, str]],
    failed: Callable[[str, str], Any],
    cells: Callable[[str, Path, Path, Baseline, float], Iterable[list[Any]]],
) -> list[Any]:
    """The grid both methods.py and accuracy.py walk: per zoo model its `Baseline` (a failure
    is the row `failed(name, error)`), per target the rows `cells(...)` yields, cell by cell;
    `args.out / md_name` is rewritten after every cell with `tables(rows)` (the table and its
    summary), which are printed at the end. Returns the rows."""
    quiet()
    command = command_line()
    print(command)
    print(header, flush=True)
    rows: list[Any] = []
    t_start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)

    def dump(final: bool = False) -> tuple[str, str]:
        table, summ = tables(rows)
        write_tables(args.out / md_name, command, table, summ, final)
        return table, summ

    for name, model_path, data_path in zoo_models(args.models.split(",")):
        try:
            base = prepare_model(model_path, data_path)
        except Exception as exc:
            rows.append(failed(name, short_error(exc)))
            continue
        for target in args.targets:
            for cell in cells(name, model_path, data_path, base, target):
                rows.extend(cell)
                dump()
    table, summ = dump(final=True)
    print()
    print(table)
    print()
    print(summ)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    return rows


def machine() -> str:
    return f"torch {torch.__version__}, {os.cpu_count()} cpus"


def grouped(
    rows: list[Any], key: Callable, done: Callable, order: Callable | None = None
) -> Iterator[tuple[Any, list[Any], list[Any]]]:
    """Per distinct `key(row)` (first-seen order, or sorted by `order`): the key, its rows and
    those of them that are `done`."""
    keys = list(dict.fromkeys(key(r) for r in rows))
    for k in keys if order is None else sorted(keys, key=order):
        mine = [r for r in rows if key(r) == k]
        yield k, mine, [r for r in mine if done(r)]


def timed_run(
    spec: JobSpec, model: Path, data: Path, out: Path, runs: int
) -> tuple[Report, float, dict[int, float]]:
    """`engine.pipeline.run` of one job: its report, wall seconds and speedup per batch."""
    t0 = time.perf_counter()
    report = run(spec, model, data, out, latency_runs=runs, catalog=registry)
    wall = time.perf_counter() - t0
    return report, wall, {lat.batch_size: lat.speedup for lat in report.latency_ms}
