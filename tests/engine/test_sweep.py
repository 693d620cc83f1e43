"""Budget sweeps: one job, one valid pruned model per point of a list target, each within
the target's tolerance of its point, and a Pareto table consistent with the numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from engine import run
from engine.flops import onnx_costs
from engine.sweep import pareto_flags, select
from methods import registry
from prunery.report import Report, SweepPoint, TargetResult, render_markdown
from prunery.report_text import format_report
from prunery.spec import JobSpec, Target
from prunery.types import ExitCode
from server_cli import prune as local

POINTS = [0.75, 0.5, 0.3]
SPEC = {
    "method": {"name": "l1_norm"},
    "target": {"flops": POINTS},
    "recovery": {"mode": "none"},
    "gates": {"min_speedup": None},  # not a speed test
}


PROGRESS: list[tuple[str, float, str | None]] = []


@pytest.fixture(scope="module")
def swept(zoo_model, digits_npz, tmp_path_factory) -> tuple[Report, Path]:
    out = tmp_path_factory.mktemp("sweep")
    spec = JobSpec.model_validate(SPEC)

    def progress(stage: str, fraction: float, message: str | None) -> None:
        PROGRESS.append((stage, fraction, message))

    report = run(
        spec, zoo_model("vgg"), digits_npz, out, progress, catalog=registry, latency_runs=20
    )
    return report, out


def test_progress_runs_once_through_the_bar(swept):
    # Load and analyse own [0, 0.12]; point k of 3 owns the k-th third of the rest.
    starts = [f for _, f, m in PROGRESS if m and m.endswith("…")]  # each stage's start
    assert starts == sorted(starts) and PROGRESS[-1][1] == pytest.approx(1.0)
    for stage, fraction, message in PROGRESS:
        if stage in ("load", "analyse"):
            assert fraction <= 0.12 + 1e-9 and not (message or "").startswith("point")
            continue
        k = int((message or "").split()[1].split("/")[0])  # "point k/3 …"
        lo, hi = 0.12 + 0.88 * (k - 1) / 3, 0.12 + 0.88 * k / 3
        assert lo - 1e-9 <= fraction <= hi + 1e-9, (stage, fraction, message)
    # load and analyse once; every other stage once per point, its message naming the point
    assert sum(1 for s, _, m in PROGRESS if s == "analyse" and m == "analyse…") == 1
    for i, label in enumerate(["flops-0.75", "flops-0.5", "flops-0.3"]):
        assert any(m == f"point {i + 1}/3 {label}: prune…" for _, _, m in PROGRESS)


def _ort_predict(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_one_valid_model_per_point_within_tolerance(swept, digits_npz, zoo_model):
    report, out = swept
    assert report.sweep is not None and [p.label for p in report.sweep] == [
        "flops-0.75",
        "flops-0.5",
        "flops-0.3",
    ]
    data = np.load(digits_npz)
    x, y = data["x_test"].astype(np.float32), data["y_test"]
    base = onnx.load(str(zoo_model("vgg")))
    feed = {base.graph.input[0].name: x[:1]}
    base_macs = onnx_costs(base, feed).macs
    models = set()
    for point, requested in zip(report.sweep, POINTS, strict=True):
        path = out / point.artifacts["model.onnx"]
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
        models.add(path.read_bytes())
        # Each point within the tolerance of its own request, counted again on its ONNX.
        achieved = onnx_costs(model, feed).macs / base_macs
        assert abs(achieved - requested) <= 0.01, (point.label, achieved)
        assert point.target.requested == requested and point.target.met
        assert abs(point.target.achieved - achieved) < 1e-6
        assert abs(point.macs_ratio - achieved) < 1e-6
        # onnxruntime runs it, and its accuracy is the one the sweep table reports.
        logits = _ort_predict(path, x)
        assert logits.shape == (len(x), 10)
        assert abs(float((logits.argmax(1) == y).mean()) - point.accuracy) < 1e-9
        # The point's own report says the same.
        own = Report.model_validate_json((out / point.artifacts["report.json"]).read_text())
        assert own.sweep is None and own.target == point.target
        assert own.accuracy is not None and own.accuracy.after == point.accuracy
        assert {lat.batch_size: lat.speedup for lat in own.latency_ms} == point.speedup
    assert len(models) == len(POINTS)  # three different networks


def test_pareto_flags_and_selection_follow_the_numbers(swept):
    report, out = swept
    pts = report.sweep
    for p in pts:
        dominated = any(
            q is not p
            and (q.accuracy or 0) >= (p.accuracy or 0)
            and q.macs_ratio <= p.macs_ratio
            and all(q.speedup[b] >= p.speedup[b] for b in p.speedup)
            and (
                (q.accuracy or 0) > (p.accuracy or 0)
                or q.macs_ratio < p.macs_ratio
                or any(q.speedup[b] > p.speedup[b] for b in p.speedup)
            )
            for q in pts
        )
        assert p.pareto == (not dominated), p.label
    # The fewest MACs (0.3) has no rival on MACs: always on the front.
    assert pts[-1].pareto
    # Every gate passed (no accuracy gate): the selected point is the smallest, and the
    # top-level model and report are its.
    assert all(p.gates_passed for p in pts) and report.gates_passed
    assert [p.selected for p in pts] == [False, False, True]
    assert report.target == pts[-1].target
    assert (out / "model.onnx").read_bytes() == (out / pts[-1].artifacts["model.onnx"]).read_bytes()
    top = json.loads((out / "report.json").read_text())
    assert len(top["sweep"]) == 3 and top["spec_hash"] == JobSpec.model_validate(SPEC).spec_hash()
    assert "budget sweep of 3 points" in top["notes"][0]
    assert "## Budget sweep" in (out / "report.md").read_text()
    # Only plain files (what the service stores) and no temporary folder left behind.
    assert all(p.is_file() for p in out.iterdir())
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", "model.pt2", "report.json", "report.md", "report.html"} <= names
    for p in pts:
        assert set(p.artifacts.values()) <= names


def _row(label: str, acc: float, macs: float, s1: float, passed: bool = True) -> SweepPoint:
    t = TargetResult(kind="flops", requested=macs, achieved=macs, tolerance=0.01, met=True)
    return SweepPoint(
        label=label,
        target=t,
        macs_ratio=macs,
        params_ratio=macs,
        accuracy=acc,
        accuracy_drop=0.0,
        speedup={1: s1},
        gates_passed=passed,
        pareto=False,
        selected=False,
    )


def test_pareto_known_answers():
    a = _row("a", 0.99, 0.75, 1.2)
    b = _row("b", 0.98, 0.50, 1.1)  # fewer MACs but slower than a: still on the front
    c = _row("c", 0.97, 0.50, 1.0)  # b has more accuracy, same MACs, more speed: dominated
    d = _row("d", 0.90, 0.25, 2.0)
    assert pareto_flags([a, b, c, d]) == [True, True, False, True]
    assert pareto_flags([a, _row("a2", 0.99, 0.75, 1.2)]) == [True, True]  # ties: both
    assert select([a, b, c, d]) == 3
    d.gates_passed = False
    assert select([a, b, c, d]) in (1, 2)  # the fewest MACs among those that passed
    assert select([_row("x", 0.5, 0.6, 1, False), _row("y", 0.4, 0.3, 1, False)]) == 0


def test_spec_sweeps_validate_with_messages_that_say_what_to_fix():
    t = Target.model_validate({"flops": [0.75, 0.5, 0.25]})
    assert (
        t.is_sweep and t.kind == "flops" and t.labels == ["flops-0.75", "flops-0.5", "flops-0.25"]
    )
    assert [p.flops for p in t.points()] == [0.75, 0.5, 0.25]
    assert all(not p.is_sweep and p.tolerance == 0.01 for p in t.points())
    with pytest.raises(ValueError, match="use Target.points"):
        t.fraction  # noqa: B018
    with pytest.raises(TypeError, match="one fraction per point"):
        float(t.flops)
    # A latency sweep's default tolerance is 5% of its smallest point, stable through JSON.
    lat = Target.model_validate({"latency": [0.8, 0.4], "latency_batch": 32})
    again = Target.model_validate_json(lat.model_dump_json())
    assert lat.tolerance == again.tolerance == 0.02
    assert [(p.latency, p.latency_batch, p.tolerance) for p in again.points()] == [
        (0.8, 32, 0.02),
        (0.4, 32, 0.02),
    ]
    bad = [
        ({"flops": [0.5, 0.5]}, r"must be distinct \(0.5 given twice\)"),
        ({"params": [0.5]}, "at least 2 items"),
        ({"flops": [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]}, "at most 8 items"),
        ({"flops": [0.5, 1.2]}, r"flops.sweep.1\n.*less than or equal to 1"),
        ({"flops": [0.5, 0.0]}, "greater than 0"),
        ({"flops": 1.5}, r"flops.fraction\n.*less than or equal to 1"),
    ]
    for target, message in bad:
        with pytest.raises(ValueError, match=message):
            Target.model_validate(target)
    # A scalar target is what it was: same dump, same spec hash (the hash covers every
    # default, so it moves only when one does: last, recovery.batch_size null).
    one = JobSpec.model_validate({"target": {"flops": 0.5}})
    assert one.model_dump(mode="json")["target"]["flops"] == 0.5
    assert one.spec_hash() == "94d7dc53017f91aceec9b9cecb0f3ca9e806da7d3270ccaffa94d5e280ad7714"
    assert one.target.points() == [one.target] and one.target.fraction == 0.5


def test_cli_flags_parse_a_sweep_and_the_summary_prints_the_table(swept, capsys):
    from prunery.cli.spec_flags import SpecError, spec_from_args

    args = local.build_parser().parse_args(
        ["m.onnx", "--data", "d.npz", "--out", "o", "--target-flops", "0.75,0.5,0.25"]
    )
    assert spec_from_args(args).target.flops == [0.75, 0.5, 0.25]
    args = local.build_parser().parse_args(
        ["m.onnx", "--data", "d.npz", "--out", "o", "--target-params", "0.6"]
    )
    assert spec_from_args(args).target.params == 0.6
    for text in ("0.5,abc", "0.5,0.5"):
        args = local.build_parser().parse_args(
            ["m.onnx", "--data", "d.npz", "--out", "o", "--target-flops", text]
        )
        with pytest.raises(SpecError, match=r"target[.-]flops"):
            spec_from_args(args)
    report, _ = swept
    text = format_report(report)
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("point "))
    assert "speedup b1" in lines[header] and "speedup b32" in lines[header]
    rows = lines[header + 2 : header + 5]
    assert [r.split()[0] for r in rows] == ["flops-0.75", "flops-0.5", "flops-0.3"]
    for row, p in zip(rows, report.sweep, strict=True):
        assert f"{p.macs_ratio:.3f}" in row and f"{p.accuracy:.4f}" in row
        assert ("*" in row) == p.selected and "!" not in row
        assert ("P" in row.split()[-1]) == p.pareto


def test_prunery_prune_runs_a_sweep(zoo_model, digits_npz, tmp_path, capsys):
    code = local.main(
        [
            str(zoo_model("vgg")),
            "--data",
            str(digits_npz),
            "--method",
            "l1_norm",
            "--recovery",
            "none",
            "--target-params",
            "0.6,0.4",
            "--min-speedup",
            "null",
            "--latency-runs",
            "20",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    printed = capsys.readouterr().out
    assert code == ExitCode.OK, printed
    assert "budget sweep (2 points)" in printed and "params-0.6" in printed
    assert "params-0.4__model.onnx" in printed
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    for point, requested in zip(report["sweep"], [0.6, 0.4], strict=True):
        assert abs(point["params_ratio"] - requested) <= 0.01
        assert (tmp_path / "out" / point["artifacts"]["model.onnx"]).is_file()


def test_sweep_table_marks_missed_gates_and_shows_achieved_latency():
    a = _row("latency-0.8", 0.99, 0.6, 1.3, passed=False)
    a.failed_gates = ["target"]
    a.target = TargetResult(kind="latency", requested=0.8, achieved=0.74, tolerance=0.04, met=False)
    b = _row("latency-0.6", 0.95, 0.4, 1.7)
    b.target = TargetResult(kind="latency", requested=0.6, achieved=0.61, tolerance=0.04, met=True)
    b.selected = True
    base = {
        "task": "classification",
        "method": {"name": "l1_norm"},
        "recovery": {},
        "target": b.target,
        "macs": {"before": 1, "after": 0.4},
        "params": {"before": 1, "after": 0.4},
        "latency_ms": [],
        "file_bytes": {"before": 1, "after": 1},
        "parity": {},
        "layers": [],
        "excluded": [],
        "stage_seconds": {},
        "seed": 0,
        "model_sha256": "0" * 64,
        "spec_hash": "0" * 64,
        "versions": {},
        "device": "cpu",
        "sweep": [a, b],
    }
    report = Report.model_validate(base)
    text = format_report(report)
    assert "latency kept" in text
    row_a = next(line for line in text.splitlines() if line.strip().startswith("latency-0.8"))
    row_b = next(line for line in text.splitlines() if line.strip().startswith("latency-0.6"))
    assert "0.740" in row_a and row_a.rstrip().endswith("!target")
    assert "0.610" in row_b and row_b.rstrip().endswith("*")
    assert "| latency-0.8 | 0.740 |" in render_markdown(report)
    # The report's JSON round-trips (batch-size keys are JSON strings).
    again = Report.model_validate_json(report.model_dump_json())
    assert again.sweep == report.sweep and again.sweep[1].speedup == {1: 1.7}


def test_an_unreachable_point_fails_the_sweep_naming_it(zoo_model, digits_npz, tmp_path, capsys):
    code = local.main(
        [
            str(zoo_model("vgg")),
            "--data",
            str(digits_npz),
            "--method",
            "l1_norm",
            "--recovery",
            "none",
            "--target-flops",
            "0.001,0.5",
            "--min-speedup",
            "null",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err
    assert code == ExitCode.BAD_INPUT
    assert "budget_unreachable: budget sweep point flops-0.001: the target keeps 0.1%" in err
    # Nothing half-written: only the analysis is kept (what can be pruned, and why).
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["analysis.json"]


def test_report_html_plots_the_sweep(swept):
    """report.html (written by the sweep) has the accuracy-vs-MACs plot with one point per
    budget, Pareto points filled, and the sweep table with every label."""
    import re

    report, out = swept
    page = (out / "report.html").read_text()
    plot = re.search(r'<svg[^>]*data-plot="sweep-pareto".*?</svg>', page, re.S)
    assert plot is not None, "no sweep plot on the page"
    circles = re.findall(r'<circle [^>]*fill="([^"]+)"', plot.group(0))
    assert len(circles) == len(report.sweep)
    filled = sum(1 for c in circles if c != "#fff")
    assert filled == sum(1 for p in report.sweep if p.pareto)
    for p in report.sweep:
        assert p.label in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
