"""`prunery prune`: run the engine locally, no server.

    prunery prune MODEL.onnx --data DATA.npz --method l1_norm --target-flops 0.5 --epochs 3 --out OUTDIR

Writes OUTDIR/model.onnx, OUTDIR/report.json and OUTDIR/report.md — all or nothing: the
run works in a temporary sibling directory that is renamed into place only on success.
The job-spec flags are `prunery submit`'s (prunery.cli.spec_flags).

Exit codes (prunery.types.ExitCode, the same as the remote `prunery submit --wait`):
0 success (all gates held), 2 bad input (the message says what to fix), 3 the run failed
(internal error), 4 finished but a gate was missed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

from prunery.cli import layers_count
from prunery.cli.plugins import Command
from prunery.cli.spec_flags import SpecError, add_spec_flags, spec_from_args
from prunery.report_text import DEFAULT_LAYERS, format_report
from prunery.spec import JobSpec
from prunery.types import ExitCode

DESCRIPTION = "Structurally prune an ONNX model locally and write the pruned ONNX plus a report."


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="the trained model, an .onnx file")
    p.add_argument(
        "--data",
        type=Path,
        required=True,
        help=".npz (x_train, y_train, x_test, y_test) or an image-folder zip/tar",
    )
    p.add_argument(
        "--eval-data",
        type=Path,
        help="a separate evaluation dataset (its test split, or all of an .npz of x, y): accuracy and latency are measured on it",
    )
    add_spec_flags(p)
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument(
        "--latency-runs",
        type=int,
        default=30,
        help="timed onnxruntime runs per model and batch size (>= 20)",
    )
    p.add_argument(
        "--ort-threads",
        type=int,
        help="onnxruntime intra-op threads for every latency measurement (default 1: two "
        "thread pools timed alternately compete, and multi-threaded ratios of small models are "
        "noise; 0: onnxruntime's default, one per core)",
    )
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--json", action="store_true", help="print the report JSON instead of the table")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument(
        "--layers",
        type=layers_count,
        default=DEFAULT_LAYERS,
        metavar="N|all",
        help=f"rows of the per-layer table in the summary (default {DEFAULT_LAYERS}, the biggest changes)",
    )
    p.add_argument(
        "--debug",
        action="store_true",
        default=os.environ.get("PRUNERY_DEBUG") == "1",
        help="print the full traceback of an internal error (also PRUNERY_DEBUG=1)",
    )


def build_parser() -> argparse.ArgumentParser:
    return COMMAND.parser("prune")


def build_spec(args: argparse.Namespace) -> JobSpec:
    """The JobSpec of the flags (raises SpecError on bad input)."""
    return spec_from_args(args)


def _fail(message: str) -> int:
    print(f"prunery prune: error: {message}", file=sys.stderr)
    return ExitCode.BAD_INPUT


class _Progress:
    """A tqdm bar on a terminal; one line per stage otherwise (logs, CI)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bar: Any = None
        self.stage: str | None = None
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=1000,
                unit="‰",
                file=sys.stderr,
                bar_format="{desc:<40.40} {bar} {percentage:3.0f}% {elapsed}",
            )

    def __call__(self, stage: str, fraction: float, message: str | None) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.n = int(fraction * 1000)
            self.bar.set_description_str(f"{stage}: {message}" if message else stage, refresh=False)
            self.bar.refresh()
        elif stage != self.stage:
            print(
                f"[{fraction:6.1%}] {stage}" + (f": {message}" if message else ""),
                file=sys.stderr,
                flush=True,
            )
        self.stage = stage

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished files into OUTDIR (created if missing) — each by atomic rename."""
    if not out.exists():
        try:
            os.rename(tmp, out)
            return
        except OSError:
            out.mkdir(parents=True, exist_ok=True)
    for f in sorted(tmp.iterdir()):
        os.replace(f, out / f.name)
    shutil.rmtree(tmp, ignore_errors=True)


def _keep_analysis(tmp: Path, out: Path) -> str:
    """A budget that cannot be reached: keep the analysis (excluded layers with reasons)."""
    src = tmp / "analysis.json"
    if not src.is_file():
        return ""
    out.mkdir(parents=True, exist_ok=True)
    os.replace(src, out / "analysis.json")
    return f" (what can be pruned, and why the rest cannot: {out / 'analysis.json'}; `prunery analyze` prints it)"


_terminated = False


def _stop_on_sigterm() -> None:
    """SIGTERM stops the run like Ctrl-C does: the KeyboardInterrupt unwinds to main(),
    which removes the temporary output directory (a killed run leaves nothing behind)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):  # noqa: ARG001
        global _terminated
        _terminated = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    # Ctrl-C works even when the parent started us with SIGINT ignored (a non-interactive
    # shell's background job): Python then keeps SIG_IGN instead of raising KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.default_int_handler)


def run(args: argparse.Namespace) -> int:
    if not args.model.is_file():
        return _fail(f"model file {str(args.model)!r} does not exist")
    if not args.data.is_file():
        return _fail(f"dataset file {str(args.data)!r} does not exist")
    if args.eval_data is not None and not args.eval_data.is_file():
        return _fail(f"evaluation dataset file {str(args.eval_data)!r} does not exist")
    if args.out.exists() and not args.out.is_dir():
        return _fail(f"--out {str(args.out)!r} exists and is not a directory")
    if args.latency_runs < 20:
        return _fail("--latency-runs must be at least 20")
    try:
        spec = build_spec(args)
    except SpecError as exc:
        return _fail(str(exc))

    from core.errors import EngineError

    parent = args.out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    try:
        model_path, bundle = _model_file(args.model, parent)
    except EngineError as exc:
        return _fail(f"{exc.code}: {exc.message}")
    try:
        return _run(args, spec, model_path, parent)
    finally:
        if bundle is not None:
            shutil.rmtree(bundle, ignore_errors=True)


def _model_file(model: Path, parent: Path) -> tuple[Path, Path | None]:
    """The .onnx to prune: the file itself, or — for a .zip of an .onnx and its external
    data, as POST /v1/models takes it — one self-contained .onnx made from it (the same
    archive guards as the service), in a temporary folder returned for removal."""
    from core.validation.onnx_bundle import embed_bundle, is_zip

    if not is_zip(model):
        return model, None
    bundle = Path(tempfile.mkdtemp(prefix=".bundle-", dir=parent))
    try:
        name = embed_bundle(model, bundle / "embedded.onnx")
        path = bundle / Path(name).name
        (bundle / "embedded.onnx").rename(path)
    except BaseException:
        shutil.rmtree(bundle, ignore_errors=True)
        raise
    return path, bundle


def _run(args: argparse.Namespace, spec: JobSpec, model_path: Path, parent: Path) -> int:
    from core.errors import EngineError
    from engine import run
    from methods import registry

    tmp = Path(tempfile.mkdtemp(prefix=f".{args.out.name}.tmp-", dir=parent))
    bar = _Progress(args.quiet)
    _stop_on_sigterm()
    try:
        report = run(
            spec,
            model_path,
            args.data,
            tmp,
            progress=bar,
            device=args.device,
            latency_runs=args.latency_runs,
            latency_threads=args.ort_threads,
            eval_data_path=args.eval_data,
            catalog=registry,
        )
    except EngineError as exc:
        bar.close()
        hint = _keep_analysis(tmp, args.out) if exc.code == "budget_unreachable" else ""
        shutil.rmtree(tmp, ignore_errors=True)
        return _fail(f"{exc.code}: {exc.message}{hint}")
    except KeyboardInterrupt:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
        print("prunery prune: interrupted; nothing was written", file=sys.stderr)
        return 143 if _terminated else 130
    except Exception as exc:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
        if args.debug:
            traceback.print_exc()
        print(f"prunery prune: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        if not args.debug:
            print(
                "run again with --debug (or PRUNERY_DEBUG=1) for the full traceback",
                file=sys.stderr,
            )
        return ExitCode.JOB_FAILED
    bar.close()
    _publish(tmp, args.out)
    if args.json:
        print(report.model_dump_json(indent=2))
    else:
        print(format_report(report, args.layers, more=f"the full table is in {args.out}/report.md"))
        print(f"\nwrote {args.out}/model.onnx, report.json, report.md, report.html, analysis.json")
        if report.sweep:
            chosen = next(p.label for p in report.sweep if p.selected)
            models = ", ".join(p.artifacts.get("model.onnx", "-") for p in report.sweep)
            print(
                f"budget sweep: model.onnx and report.json are {chosen}'s; each point has "
                f"<point>__model.onnx, __report.json, ... ({models})"
            )
    return ExitCode.OK if report.gates_passed else ExitCode.GATE_MISSED


COMMAND = Command(
    help="prune an ONNX model locally, no server; `prunery prune --help`",
    description=DESCRIPTION,
    configure=configure,
    run=run,
)


def main(argv: list[str] | None = None) -> int:
    return COMMAND.main("prune", argv)


if __name__ == "__main__":
    sys.exit(main())
