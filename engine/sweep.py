"""Budget sweeps: one job, one pruned model per point of a list target.

`target.flops` (or `params`, `latency`) may be a list of 2..8 fractions, e.g.
`{"flops": [0.75, 0.5, 0.25]}`. The model is loaded, converted, proven and analysed once
(`engine.prepare`); each point then runs the single-target stages (`run_prepared`: prune,
recover, export and verify, report) on that one preparation, rebound to the point's scalar
target (`Prepared.rebind`: the analysis does not depend on the target). Before each point
the random state is put back to what it was right after the analysis, so a point's model
is the one a single job with that target would give (up to latency-measured width choices,
which are timings); methods work on copies of the original (`ctx.copy_model`), and a
fingerprint of its weights is checked after every point, so a point can never prune what
an earlier point left behind.

What one sweep writes into `out_dir` (all plain files: the service stores them under the
same names, and `GET /v1/jobs/{id}/artifacts/{name}` serves them, names having no `/`):

* `<label>__model.onnx`, `<label>__model.pt2`, `<label>__report.json`, `.md`, `.html` and
  what the method adds, for each point (`label` is e.g. `flops-0.75`);
* `analysis.json` (shared), and `model.onnx`, `model.pt2`, `report.json`, `report.md`,
  `report.html` of the **selected** point: the one with the fewest MACs among the points
  that passed every gate (when none passed, the one with the most MACs, and the job's
  gates fail with its gates). The top-level report is that point's report plus `sweep`
  (every point: achieved budget, MACs and parameter ratios, top-1, drop, latency and
  speedup per batch size, gates, `pareto`, `selected`, artifact names), the sweep's spec
  hash, the stage seconds of the whole job and a note saying which point it is.

`pareto`: no other point has at least its accuracy, at most its MACs and at least its
speedup at every batch size, and is better in one of them. Speedups (original / pruned,
timed interleaved within the point) are compared rather than raw milliseconds, so a
machine that drifts during a long sweep does not decide the table.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.errors import EngineError
from core.validation import onnx_checks as checks
from engine import export as export_mod
from engine.method import MethodCatalog
from engine.prepare import prepare
from engine.tracker import STAGES, ProgressFn, Tracker
from prunery.html_report import render_html
from prunery.report import (
    SWEEP_SEPARATOR,
    Report,
    SweepPoint,
    render_markdown,
    sweep_artifact_name,
)
from prunery.spec import JobSpec

REWRITTEN = ("report.json", "report.md", "report.html")  # the top level's own


def run_sweep(
    spec: JobSpec,
    model_path: Path | str,
    data_path: Path | str,
    out_dir: Path,
    progress: ProgressFn | None = None,
    *,
    catalog: MethodCatalog,
    device: str | None = None,
    max_model_bytes: int = checks.DEFAULT_MAX_MODEL_BYTES,
    latency_runs: int = 30,
    latency_threads: int | None = None,
    eval_data_path: Path | str | None = None,
) -> Report:
    """Every point of `spec.target`'s sweep on one preparation; returns the top-level report
    (the selected point's, with `sweep`). See the module docstring for what is written."""
    from engine.pipeline import run_prepared

    labels = spec.target.labels
    specs = [spec.model_copy(update={"target": t}) for t in spec.target.points()]
    tracker = Tracker(progress)
    base = prepare(
        specs[0],
        model_path,
        data_path,
        catalog=catalog,
        device=device,
        tracker=tracker,
        out_dir=out_dir,
        max_model_bytes=max_model_bytes,
        eval_data_path=eval_data_path,
    )
    shared = dict(tracker.finish())
    notes, rng, original = list(base.notes), _rng_state(), _fingerprint(base.module)
    reports: list[Report] = []
    files: list[list[str]] = []
    for i, (point_spec, label) in enumerate(zip(specs, labels, strict=True)):
        prep = base.rebind(point_spec, catalog)
        prep.notes = list(notes)
        _set_rng(rng)
        point_tracker = Tracker(_point_progress(progress, i, len(specs), label))
        point_tracker.timings = dict(shared)
        work = out_dir / f".{label}.tmp"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        try:
            report = run_prepared(
                prep,
                point_tracker,
                work,
                latency_runs=latency_runs,
                latency_threads=latency_threads,
            )
            files.append(_publish_point(work, out_dir, label))
        except EngineError as exc:  # say which point could not be done
            exc.args = (f"budget sweep point {label}: {exc.message}", *exc.args[1:])
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if _fingerprint(base.module) != original:
            raise RuntimeError(
                f"method {spec.method.name!r} changed the original model's weights while "
                f"pruning sweep point {label}; the later points would start from them"
            )
        reports.append(report)
    top = combine(spec, labels, reports, files, shared)
    _write_top(top, out_dir, labels[_selected(top)], base.public_analysis)
    return top


def _point_progress(progress: ProgressFn | None, i: int, n: int, label: str) -> ProgressFn | None:
    """Point i of n owns the i-th n-th of the bar after the shared load and analyse."""
    if progress is None:
        return None
    lo = STAGES["prune"][0]

    def report(stage: str, fraction: float, message: str | None) -> None:
        local = (fraction - lo) / (1.0 - lo)
        what = f"point {i + 1}/{n} {label}" + (f": {message}" if message else "")
        progress(stage, lo + (1.0 - lo) * (i + local) / n, what)

    return report


def _publish_point(work: Path, out_dir: Path, label: str) -> list[str]:
    """The point's files, renamed into `out_dir` as `<label>__<name>`; their plain names."""
    names = sorted(p.name for p in work.iterdir() if p.is_file())
    for name in names:
        os.replace(work / name, out_dir / sweep_artifact_name(label, name))
    return names


def _quality(report: Report) -> tuple[float | None, float | None]:
    """Top-1 after and its drop in points (next-token accuracy for a language model)."""
    if report.accuracy is not None:
        return report.accuracy.after, report.accuracy.drop
    m = report.metrics.get("next_token_accuracy")
    if m is not None:
        return m.after, (m.before - m.after) * 100.0
    return None, None


def point_row(label: str, report: Report, names: Sequence[str]) -> SweepPoint:
    accuracy, drop = _quality(report)
    return SweepPoint(
        label=label,
        target=report.target,
        macs_ratio=report.macs.ratio,
        params_ratio=report.params.ratio,
        accuracy=accuracy,
        accuracy_drop=drop,
        latency_ms={lat.batch_size: lat.after for lat in report.latency_ms},
        speedup={lat.batch_size: lat.speedup for lat in report.latency_ms},
        gates_passed=report.gates_passed,
        failed_gates=[g.name for g in report.gates if not g.passed],
        pareto=False,
        selected=False,
        artifacts={name: sweep_artifact_name(label, name) for name in names},
    )


def _objectives(p: SweepPoint) -> list[float]:
    """Larger is better in each: accuracy, fewer MACs, speedup per batch size."""
    out = [p.accuracy] if p.accuracy is not None else []
    return out + [-p.macs_ratio] + [p.speedup[b] for b in sorted(p.speedup)]


def pareto_flags(points: Sequence[SweepPoint]) -> list[bool]:
    """True for each point that no other point dominates (>= in every objective, > in one)."""
    objs = [_objectives(p) for p in points]

    def dominates(a: list[float], b: list[float]) -> bool:
        return len(a) == len(b) and all(x >= y for x, y in zip(a, b, strict=True)) and a != b

    return [not any(dominates(o, mine) for o in objs) for mine in objs]


def select(points: Sequence[SweepPoint]) -> int:
    """The fewest MACs among the points that passed every gate; else the most MACs."""
    passing = [i for i, p in enumerate(points) if p.gates_passed]
    if passing:
        return min(passing, key=lambda i: points[i].macs_ratio)
    return max(range(len(points)), key=lambda i: points[i].macs_ratio)


def _selected(report: Report) -> int:
    assert report.sweep is not None
    return next(i for i, p in enumerate(report.sweep) if p.selected)


def _stage_seconds(reports: Sequence[Report], shared: dict[str, float]) -> dict[str, float]:
    """The whole job's: the shared load and analyse once, then every point's stages."""
    total = dict(shared)
    for r in reports:
        for stage, seconds in r.stage_seconds.items():
            own = seconds - shared.get(stage, 0.0)
            total[stage] = round(total.get(stage, 0.0) + max(own, 0.0), 3)
    return total


def combine(
    spec: JobSpec,
    labels: Sequence[str],
    reports: Sequence[Report],
    files: Sequence[Sequence[str]],
    shared: dict[str, float],
) -> Report:
    """The top-level report: the selected point's, with the sweep table and the job's
    spec hash, stage seconds and a note saying which point it is."""
    rows = [point_row(lab, r, f) for lab, r, f in zip(labels, reports, files, strict=True)]
    for row, flag in zip(rows, pareto_flags(rows), strict=True):
        row.pareto = flag
    chosen = select(rows)
    rows[chosen].selected = True
    passed = sum(p.gates_passed for p in rows)
    why = (
        "the fewest MACs among the points that passed every gate"
        if rows[chosen].gates_passed
        else "no point passed every gate; this is the one with the most MACs"
    )
    note = (
        f"budget sweep of {len(rows)} points ({', '.join(labels)}), {passed} passed every gate: "
        f"model.onnx and this report are {labels[chosen]}'s ({why}); each point's files are "
        f"<point>{SWEEP_SEPARATOR}model.onnx, <point>{SWEEP_SEPARATOR}report.json, …"
    )
    top = reports[chosen].model_copy(deep=True)
    top.sweep = rows
    top.spec_hash = spec.spec_hash()
    top.stage_seconds = _stage_seconds(reports, shared)
    top.notes = [note, *top.notes]
    return top


def _write_top(top: Report, out_dir: Path, label: str, analysis: Any) -> None:
    """The selected point's files under their plain names (model.onnx, model.pt2, what the
    method added), and the top-level report in three formats."""
    assert top.sweep is not None
    point = next(p for p in top.sweep if p.label == label)
    for name, stored in point.artifacts.items():
        if name in REWRITTEN:
            continue
        tmp = out_dir / f".{name}.tmp"
        shutil.copyfile(out_dir / stored, tmp)
        os.replace(tmp, out_dir / name)
    export_mod.save_atomic(top.model_dump_json(indent=2).encode(), out_dir / "report.json")
    export_mod.save_atomic(render_markdown(top).encode(), out_dir / "report.md")
    export_mod.save_atomic(render_html(top, analysis).encode(), out_dir / "report.html")


def _fingerprint(module: torch.nn.Module) -> str:
    """sha256 of the module's weights and buffers (names, shapes, bytes)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().cpu().flatten().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _rng_state() -> tuple[Any, ...]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def _set_rng(state: tuple[Any, ...]) -> None:
    py, npy, cpu, cuda = state
    random.setstate(py)
    np.random.set_state(npy)
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
