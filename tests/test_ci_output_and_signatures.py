"""CI output (JUnit XML, Markdown summary, $GITHUB_STEP_SUMMARY) and webhook signature
verification: pure SDK code, no server."""

from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET

import pytest

from core.webhooks import sign
from prunery import ci_output
from prunery.client import Job
from prunery.report import (
    AccuracyResult,
    BeforeAfter,
    GateResult,
    LayerRow,
    Report,
    SweepPoint,
    TargetResult,
)
from prunery.webhooks import InvalidSignature, verify


def _job(
    status: str = "succeeded", gates_passed: bool | None = True, error: dict | None = None
) -> Job:
    return Job.model_validate(
        {
            "id": "job_abc",
            "status": status,
            "gates_passed": gates_passed,
            "error": error,
            "spec": {"method": {"name": "l1_norm"}, "gates": {"max_accuracy_drop": 1.0}},
            "created_at": "2026-01-01T00:00:00Z",
            "updated_at": "2026-01-01T00:01:00Z",
            "started_at": "2026-01-01T00:00:05Z",
            "finished_at": "2026-01-01T00:00:45Z",
        }
    )


def _report(drop: float) -> Report:
    return Report(
        task="classification",
        method={"name": "l1_norm"},
        recovery={"mode_used": "finetune", "epochs_used": 3},
        target=TargetResult(kind="flops", requested=0.5, achieved=0.498, tolerance=0.01, met=True),
        macs=BeforeAfter(before=1e6, after=5e5),
        params=BeforeAfter(before=1e5, after=5e4),
        accuracy=AccuracyResult(before=0.98, after=0.98 - drop / 100, drop=drop, samples=360),
        latency_ms=[],
        file_bytes=BeforeAfter(before=4e5, after=2e5),
        parity={"max_abs_diff": 1e-6},
        layers=[
            LayerRow(
                name="conv|1",
                op="Conv2d",
                channels_before=32,
                channels_after=16,
                macs_before=10,
                macs_after=5,
            )
        ],
        excluded=[],
        gates=[GateResult(name="max_accuracy_drop", limit=1.0, value=drop, passed=drop <= 1.0)],
        stage_seconds={},
        seed=0,
        model_sha256="0" * 64,
        spec_hash="0" * 64,
        versions={},
        device="cpu",
    )


def _suite(text: str) -> ET.Element:
    return ET.fromstring(text.split("\n", 1)[1]).find("testsuite")


def test_junit_passing_missed_gate_failed_and_timeout():
    ok = _suite(ci_output.junit_xml(_job(), _report(0.3)))
    assert (ok.get("tests"), ok.get("failures"), ok.get("errors")) == ("3", "0", "0")
    assert ok.get("time") == "40.000"
    missed = _suite(ci_output.junit_xml(_job(gates_passed=False), _report(2.5)))
    assert missed.get("failures") == "1"
    gate = [c for c in missed.findall("testcase") if c.get("name") == "gate max_accuracy_drop"][0]
    assert "2.5000 (limit 1) MISSED" in gate.find("failure").get("message")
    failed = _suite(
        ci_output.junit_xml(
            _job("failed", None, {"error": "budget_unreachable", "detail": "raise the target"}),
            None,
        )
    )
    assert failed.get("failures") == "1" and failed.get("skipped") == "1"
    assert "budget_unreachable: raise the target" in failed.find("testcase/failure").get("message")
    timed_out = _suite(ci_output.junit_xml(_job("running", None), None, timed_out=True))
    assert timed_out.get("errors") == "1"


def test_summary_files_and_github_step_summary(tmp_path, monkeypatch):
    step = tmp_path / "step.md"
    step.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step))
    written = ci_output.write(
        _job(gates_passed=False), _report(2.5), str(tmp_path / "j.xml"), str(tmp_path / "s.md")
    )
    assert [p.name for p in written] == ["j.xml", "s.md", "step.md"]
    text = (tmp_path / "s.md").read_text()
    assert text.startswith("## ❌ Prunery job `job_abc`") and "❌ MISSED" in text
    assert "`conv\\|1` | 32 → 16" in text  # table cells are escaped
    assert step.read_text() == "earlier step\n" + text + "\n"


def _sweep_report() -> Report:
    """The selected point's report (flops-0.75 passed) with three sweep points, one of which
    missed its accuracy gate."""

    def point(frac: float, acc: float, passed: bool, **kw) -> SweepPoint:
        return SweepPoint(
            label=f"flops-{frac}",
            target=TargetResult(
                kind="flops", requested=frac, achieved=frac - 0.002, tolerance=0.01, met=True
            ),
            macs_ratio=frac - 0.002,
            params_ratio=frac - 0.05,
            accuracy=acc,
            accuracy_drop=(0.98 - acc) * 100,
            speedup={1: 1 / frac, 8: 1.1 / frac},
            gates_passed=passed,
            failed_gates=[] if passed else ["max_accuracy_drop"],
            **kw,
        )

    report = _report(0.3)
    report.sweep = [
        point(0.75, 0.977, True, pareto=True, selected=True),
        point(0.5, 0.972, True, pareto=True, selected=False),
        point(0.25, 0.90, False, pareto=True, selected=False),
    ]
    return report


def test_junit_and_summary_of_a_budget_sweep(tmp_path):
    suite = _suite(ci_output.junit_xml(_job(), _sweep_report()))
    cases = {c.get("name"): c for c in suite.findall("testcase")}
    # the job, the target, one gate, three points
    assert suite.get("tests") == "6" and len(cases) == 6
    assert suite.get("failures") == "1"
    points = [n for n in cases if n.startswith("sweep point ")]
    assert points == ["sweep point flops-0.75", "sweep point flops-0.5", "sweep point flops-0.25"]
    assert cases["sweep point flops-0.75"].find("failure") is None
    assert cases["sweep point flops-0.5"].find("failure") is None
    out = cases["sweep point flops-0.5"].find("system-out").text
    assert "MACs x0.498" in out and "top-1 0.9720" in out and "speedup b1 2.00x" in out
    assert "speedup b8 2.20x" in out
    failure = cases["sweep point flops-0.25"].find("failure")
    assert failure.get("message") == "flops-0.25: gates missed: max_accuracy_drop"
    assert "top-1 0.9000 (drop 8.00 pts)" in failure.text
    # a single-target report has no point cases
    assert not [
        c for c in _suite(ci_output.junit_xml(_job(), _report(0.3))) if "sweep" in c.get("name", "")
    ]

    text = ci_output.summary_markdown(_job(), _sweep_report())
    assert "**Budget sweep:**" in text
    assert "| point | MACs | params | top-1 | drop pts | speedup b1 | speedup b8 |  |" in text
    assert "| flops-0.75 | 0.748 | 0.700 | 0.9770 | 0.30 | 1.33x | 1.47x | P* |" in text
    assert (
        "| flops-0.25 | 0.248 | 0.200 | 0.9000 | 8.00 | 4.00x | 4.40x | P !max_accuracy_drop |"
        in text
    )
    assert "Budget sweep" not in ci_output.summary_markdown(_job(), _report(0.3))


def test_signature_roundtrip_and_refusals():
    body = json.dumps({"id": "job_abc", "status": "succeeded"}).encode()
    header = sign("whsec_k", body)
    assert verify(body, header, "whsec_k")["status"] == "succeeded"
    for bad_body, bad_header, secret, why in (
        (body + b" ", header, "whsec_k", "mismatch"),
        (body, header, "whsec_other", "mismatch"),
        (body, None, "whsec_k", "no X-Prunery-Signature"),
        (body, "v1=abc", "whsec_k", "no t="),
        (body, sign("whsec_k", body, int(time.time()) - 3600), "whsec_k", "tolerance"),
    ):
        with pytest.raises(InvalidSignature, match=why):
            verify(bad_body, bad_header, secret)
    # Several v1 values (a rotated secret) are accepted when one matches.
    t = header.split(",")[0]
    assert verify(body, f"{t},v1=deadbeef,{header.split(',')[1]}", "whsec_k")
