"""The engine pipeline: load → analyse → prune → recover → export → verify → report.

Each stage is a public function with explicit inputs and outputs (small dataclasses), so
tests, benchmarks and the CLI run exactly the job's stages:

    prep = prepare(spec, model_path, data_path, catalog=catalog)   # engine.prepare
    pruned = prune(prep, progress)                                  # engine.stages
    recovered = recover(prep, pruned, progress)                     # engine.stages
    verified = export_and_verify(prep, recovered.model)             # engine.verify
    report = build_report(prep, pruned, recovered, verified, ...)   # engine.reporting
"""

from __future__ import annotations

from pathlib import Path

from core.validation import onnx_checks as checks
from engine.method import MethodCatalog
from engine.prepare import Prepared, dynamic_batch, instantiate, prepare
from engine.reporting import build_report, write_artifacts
from engine.stages import LATENCY_BATCHES, Pruned, Recovered, prune, recover
from engine.tracker import ProgressFn, Tracker
from engine.verify import Verified, export_and_verify
from prunery.report import Report
from prunery.spec import JobSpec

__all__ = [
    "LATENCY_BATCHES",
    "Prepared",
    "ProgressFn",
    "Pruned",
    "Recovered",
    "Verified",
    "build_report",
    "dynamic_batch",
    "export_and_verify",
    "instantiate",
    "prepare",
    "prune",
    "recover",
    "run",
    "run_prepared",
]


def run(
    spec: JobSpec,
    model_path: Path | str,
    data_path: Path | str,
    out_dir: Path | str,
    progress: ProgressFn | None = None,
    *,
    catalog: MethodCatalog,
    device: str | None = None,
    max_model_bytes: int = checks.DEFAULT_MAX_MODEL_BYTES,
    latency_runs: int = 30,
    latency_threads: int | None = None,
    eval_data_path: Path | str | None = None,
) -> Report:
    """One job: writes analysis.json, model.onnx, model.pt2 and report.json/.md/.html into
    `out_dir` (each atomically) and returns the report. `progress(stage, fraction, message)`
    may raise `core.errors.Cancelled` to stop between steps. A budget sweep (a list target,
    e.g. `{"flops": [0.75, 0.5, 0.25]}`) runs `engine.sweep.run_sweep`: one model per point."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if spec.target.is_sweep:
        from engine.sweep import run_sweep  # it runs `run_prepared` per point

        return run_sweep(
            spec,
            model_path,
            data_path,
            out_dir,
            progress,
            catalog=catalog,
            device=device,
            max_model_bytes=max_model_bytes,
            latency_runs=latency_runs,
            latency_threads=latency_threads,
            eval_data_path=eval_data_path,
        )
    tracker = Tracker(progress)
    prep = prepare(
        spec,
        model_path,
        data_path,
        catalog=catalog,
        device=device,
        tracker=tracker,
        out_dir=out_dir,
        max_model_bytes=max_model_bytes,
        eval_data_path=eval_data_path,
    )
    return run_prepared(
        prep, tracker, out_dir, latency_runs=latency_runs, latency_threads=latency_threads
    )


def run_prepared(
    prep: Prepared,
    tracker: Tracker,
    out_dir: Path,
    *,
    latency_runs: int = 30,
    latency_threads: int | None = None,
) -> Report:
    """The stages after `prepare` for one (scalar) target: prune, recover, export and
    verify, report; writes model.onnx, model.pt2, report.json/.md/.html (and what the
    method adds) into `out_dir`."""
    tracker.begin("prune")
    pruned = prune(prep, tracker.sink("prune"), latency_threads=latency_threads)
    tracker.begin("recover")
    recovered = recover(prep, pruned, tracker.sink("recover"))
    verified = export_and_verify(
        prep,
        recovered.model,
        tracker,
        latency_runs=latency_runs,
        latency_threads=latency_threads,
    )
    tracker.begin("report")
    report = build_report(
        prep, pruned, recovered, verified, tracker, latency_threads=latency_threads
    )
    write_artifacts(report, prep, pruned, recovered, verified, out_dir)
    tracker.report("report", 1.0, "done")
    return report
