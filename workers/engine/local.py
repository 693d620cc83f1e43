"""`prunery prune`: run the engine locally, no server.

    prunery prune MODEL.onnx --data DATA.npz --method l1_norm --target-flops 0.5 --epochs 3 --out OUTDIR

Writes OUTDIR/model.onnx, OUTDIR/report.json and OUTDIR/report.md — all or nothing: the
run works in a temporary sibling directory that is renamed into place only on success.

Exit codes (the same as the remote `prunery submit --wait`): 0 success (all gates held),
2 bad input (the message says what to fix), 3 the run failed (internal error),
4 finished but a gate was missed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

from pydantic import ValidationError

EXIT_OK, EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_GATE = 0, 2, 3, 4


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prunery prune",
        description="Structurally prune an ONNX model locally and write the pruned ONNX plus a report.",
    )
    p.add_argument("model", type=Path, help="the trained model, an .onnx file")
    p.add_argument("--data", type=Path, required=True, help=".npz (x_train, y_train, x_test, y_test) or an image-folder zip/tar")
    p.add_argument("--eval-data", type=Path, help="a separate evaluation dataset (its test split, or all of an .npz of x, y): accuracy and latency are measured on it")
    p.add_argument("--method", default=None, help="pruning method (see `prunery methods`); default auto (tries candidates on a validation split)")
    p.add_argument("--task", choices=["classification", "language_modeling"], help="default: classification (or the --spec's)")
    tgt = p.add_mutually_exclusive_group(required=False)
    tgt.add_argument("--target-flops", type=float, help="fraction of MACs to keep, e.g. 0.5")
    tgt.add_argument("--target-params", type=float, help="fraction of parameters to keep")
    tgt.add_argument("--target-layers", type=str, help='JSON {"layer": ratio to remove, ...}')
    tgt.add_argument("--target-latency", type=float, help="fraction of the original's measured latency to keep, e.g. 0.5")
    p.add_argument("--latency-batch", type=int, help="batch size at which --target-latency is measured (default 1)")
    p.add_argument("--min-speedup", type=str, help="gate: smallest measured speedup at every batch size (default 1.0; 'null' disables)")
    p.add_argument("--tolerance", type=float, help="allowed |achieved - target| (default 0.01; latency: 5%% of the target)")
    p.add_argument("--method-param", action="append", default=[], metavar="KEY=VALUE", help="a method parameter (value parsed as JSON when it can be); repeatable")
    p.add_argument("--epochs", type=int, default=3, help="recovery epochs (default 3)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--optimizer", choices=["sgd", "adam", "adamw"], default="adam")
    p.add_argument("--no-distill", action="store_true", help="recover on the labels only (default: distil from the original model)")
    p.add_argument("--steps", type=int, help="progressive pruning: reach the target in this many steps (default 1)")
    p.add_argument("--recovery", choices=["finetune", "scratch", "none"], default="finetune")
    p.add_argument("--scratch-epochs", choices=["E", "B"], default="E", help="Scratch-E or Scratch-B (epochs x MACs_full/MACs_pruned)")
    p.add_argument("--round-to", type=int, help="keep channel counts a multiple of this (default: chosen per layer by timing it on onnxruntime)")
    p.add_argument("--opset", type=int, default=17, help="opset of the exported model (default 17)")
    p.add_argument("--max-accuracy-drop", type=float, help="gate: largest allowed top-1 drop in points")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spec", type=Path, help="a JSON job spec; the flags above override its fields")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--latency-runs", type=int, default=30, help="timed onnxruntime runs per model and batch size (>= 20)")
    p.add_argument("--ort-threads", type=int, help="onnxruntime intra-op threads for every latency measurement (default: all cores)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--json", action="store_true", help="print the report JSON instead of the table")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--debug", action="store_true", default=os.environ.get("PRUNERY_DEBUG") == "1",
                   help="print the full traceback of an internal error (also PRUNERY_DEBUG=1)")
    return p


def build_spec(args: argparse.Namespace):
    from prunery.spec import JobSpec

    body: dict[str, Any] = {}
    if args.spec:
        try:
            body = json.loads(args.spec.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SystemExit(_fail(f"cannot read --spec {args.spec}: {exc}")) from None
    params = dict(body.get("method", {}).get("params", {}))
    for item in args.method_param:
        if "=" not in item:
            raise SystemExit(_fail(f"--method-param {item!r}: use KEY=VALUE"))
        key, value = item.split("=", 1)
        params[key.strip()] = _parse_value(value)
    body["method"] = {"name": args.method or body.get("method", {}).get("name") or "auto", "params": params}
    target = dict(body.get("target", {}))
    if args.target_flops is not None:
        target = {"flops": args.target_flops}
    elif args.target_params is not None:
        target = {"params": args.target_params}
    elif args.target_latency is not None:
        target = {"latency": args.target_latency}
    elif args.target_layers is not None:
        try:
            target = {"layers": json.loads(args.target_layers)}
        except json.JSONDecodeError as exc:
            raise SystemExit(_fail(f"--target-layers is not JSON: {exc}")) from None
    if not target:
        raise SystemExit(_fail("give a budget: --target-flops 0.5, --target-params 0.5, --target-latency 0.5 or --target-layers '{...}'"))
    if args.tolerance is not None or "tolerance" not in target and "latency" not in target:
        target["tolerance"] = args.tolerance if args.tolerance is not None else 0.01
    if args.latency_batch is not None:
        target["latency_batch"] = args.latency_batch
    body["target"] = target
    rec = dict(body.get("recovery", {}))
    rec.update(mode=args.recovery, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, optimizer=args.optimizer, epochs_mode=args.scratch_epochs)
    if args.no_distill:
        rec["distill"] = {**rec.get("distill", {}), "enabled": False}
    body["recovery"] = rec
    if args.steps is not None:
        body["schedule"] = {**body.get("schedule", {}), "steps": args.steps}
    body["export"] = {**body.get("export", {}), "opset": args.opset}
    if args.round_to is not None:
        body["export"]["round_to"] = args.round_to
    body["gates"] = dict(body.get("gates", {}))
    if args.max_accuracy_drop is not None:
        body["gates"]["max_accuracy_drop"] = args.max_accuracy_drop
    if args.min_speedup is not None:
        text = args.min_speedup.strip().lower()
        try:
            body["gates"]["min_speedup"] = None if text in ("null", "none", "off") else float(text)
        except ValueError:
            raise SystemExit(_fail(f"--min-speedup {args.min_speedup!r}: give a number such as 1.0, or null to disable the gate")) from None
    body["seed"] = args.seed
    if args.task:
        body["task"] = args.task
    try:
        return JobSpec.model_validate(body)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise SystemExit(_fail(f"invalid job spec: {problems}")) from None


def _fail(message: str) -> int:
    print(f"prunery prune: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


class _Progress:
    """A tqdm bar on a terminal; one line per stage otherwise (logs, CI)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bar = None
        self.stage = None
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=1000, unit="‰", file=sys.stderr, bar_format="{desc:<40.40} {bar} {percentage:3.0f}% {elapsed}")

    def __call__(self, stage: str, fraction: float, message: str | None) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.n = int(fraction * 1000)
            self.bar.set_description_str(f"{stage}: {message}" if message else stage, refresh=False)
            self.bar.refresh()
        elif stage != self.stage:
            print(f"[{fraction:6.1%}] {stage}" + (f": {message}" if message else ""), file=sys.stderr, flush=True)
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


def print_table(report) -> None:
    from prunery.report import summary_rows

    rows = [("", "before", "after", "change"), *summary_rows(report)]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(widths[j]) if j == 0 else c.rjust(widths[j]) for j, c in enumerate(r)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    t = report.target
    print(f"\ntarget: keep {t.requested} of {'MACs' if t.kind == 'flops' else t.kind}; achieved {t.achieved:.4f} ({'met' if t.met else 'NOT met'})")
    if report.excluded:
        print(f"excluded layers: {len(report.excluded)} (reasons in report.md)")
    for note in report.notes:
        if note.startswith("uneven cut:"):
            print(note)
    for g in report.gates:
        print(f"gate {g.name}: {g.value:.3f} vs limit {g.limit} -> {'pass' if g.passed else 'FAIL'}" + (f" ({g.message})" if g.message and not g.passed else ""))


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
    except SystemExit as exc:
        return int(exc.code or EXIT_BAD_INPUT)

    from workers.engine import run
    from workers.errors import EngineError

    parent = args.out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{args.out.name}.tmp-", dir=parent))
    bar = _Progress(args.quiet)
    _stop_on_sigterm()
    try:
        report = run(
            spec, args.model, args.data, tmp, progress=bar, device=args.device,
            latency_runs=args.latency_runs, latency_threads=args.ort_threads, eval_data_path=args.eval_data,
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
            print("run again with --debug (or PRUNERY_DEBUG=1) for the full traceback", file=sys.stderr)
        return EXIT_INTERNAL
    bar.close()
    _publish(tmp, args.out)
    if args.json:
        print(report.model_dump_json(indent=2))
    else:
        print_table(report)
        print(f"\nwrote {args.out}/model.onnx, report.json, report.md, report.html, analysis.json")
    return EXIT_OK if report.gates_passed else EXIT_GATE


if __name__ == "__main__":
    sys.exit(main())
