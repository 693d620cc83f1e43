"""CI-native output of `prunery submit --wait` / `prunery wait`:

* `--junit FILE`: JUnit XML, one test case for the job itself, one for the budget target and
  one per gate (e.g. `max_accuracy_drop`), so CI systems (GitHub, GitLab, Jenkins) show a
  missed gate as a failed test with the measured value and the limit. A budget sweep adds one
  test case per point (`sweep point flops-0.5`): its MACs/parameters/top-1/speedups in
  system-out, failed (naming the missed gates) when the point did not pass its gates.
* `--summary FILE`: a Markdown summary (the summary table, a sweep's table, gates, per-layer table, excluded
  layers, notes); also appended to `$GITHUB_STEP_SUMMARY` when that is set, so it appears on
  the GitHub Actions run page.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from prunery.report import SWEEP_LEGEND, Report, SweepPoint, _fmt_int, summary_rows, sweep_rows


def _case(suite: ET.Element, name: str, seconds: float = 0.0) -> ET.Element:
    return ET.SubElement(suite, "testcase", classname="prunery", name=name, time=f"{seconds:.3f}")


def _sweep_point_text(p: SweepPoint) -> str:
    parts = [
        f"{p.label}: MACs x{p.macs_ratio:.3f}",
        f"params x{p.params_ratio:.3f}",
    ]
    if p.target.kind == "latency":
        parts.append(f"latency kept {p.target.achieved:.3f}")
    if p.accuracy is not None:
        drop = f" (drop {p.accuracy_drop:.2f} pts)" if p.accuracy_drop is not None else ""
        parts.append(f"top-1 {p.accuracy:.4f}{drop}")
    parts += [f"speedup b{b} {s:.2f}x" for b, s in sorted(p.speedup.items())]
    marks = [m for m, on in (("Pareto-optimal", p.pareto), ("selected", p.selected)) if on]
    return ", ".join(parts + marks)


def junit_xml(job: Any, report: Report | None, timed_out: bool = False) -> str:
    """The JUnit XML document (a string). `job` is a prunery.client.Job."""
    suite = ET.Element("testsuite", name=f"prunery {job.id}")
    duration = 0.0
    if job.started_at and job.finished_at:
        duration = (job.finished_at - job.started_at).total_seconds()
    method = (job.spec.get("method") or {}).get("name", "?")
    case = _case(suite, f"job {job.id} ({method})", duration)
    if timed_out:
        ET.SubElement(
            case,
            "error",
            message=f"timed out waiting; the job is still {job.status}",
            type="timeout",
        )
    elif job.status != "succeeded":
        err = job.error
        message = f"{err.error}: {err.detail}" if err else job.status
        ET.SubElement(case, "failure", message=message, type=job.status).text = message
    if report is not None:
        t = report.target
        case = _case(suite, f"target {t.kind}")
        what = "MACs" if t.kind == "flops" else t.kind
        text = f"requested {t.requested} of the {what}, achieved {t.achieved:.4f} (tolerance {t.tolerance})"
        ET.SubElement(case, "system-out").text = text
        if not t.met:
            ET.SubElement(case, "failure", message=text, type="target_missed").text = text
        for g in report.gates:
            case = _case(suite, f"gate {g.name}")
            text = (
                f"{g.name}: {g.value:.4f} (limit {g.limit:g}) {'passed' if g.passed else 'MISSED'}"
            )
            ET.SubElement(case, "system-out").text = text
            if not g.passed:
                ET.SubElement(case, "failure", message=text, type="gate_missed").text = text
        for p in report.sweep or []:
            case = _case(suite, f"sweep point {p.label}")
            text = _sweep_point_text(p)
            ET.SubElement(case, "system-out").text = text
            if not p.gates_passed:
                missed = ", ".join(p.failed_gates) or "?"
                message = f"{p.label}: gates missed: {missed}"
                ET.SubElement(
                    case, "failure", message=message, type="gate_missed"
                ).text = f"{message}\n{text}"
    else:  # a job that never produced a report cannot have passed its gates
        gates = job.spec.get("gates") or {}
        for name, limit in gates.items():
            if limit is None:
                continue
            case = _case(suite, f"gate {name}")
            ET.SubElement(case, "skipped", message=f"no report: the job is {job.status}")
    cases = suite.findall("testcase")
    suite.set("tests", str(len(cases)))
    suite.set("failures", str(sum(1 for c in cases if c.find("failure") is not None)))
    suite.set("errors", str(sum(1 for c in cases if c.find("error") is not None)))
    suite.set("skipped", str(sum(1 for c in cases if c.find("skipped") is not None)))
    suite.set("time", f"{duration:.3f}")
    root = ET.Element("testsuites")
    root.append(suite)
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def summary_markdown(job: Any, report: Report | None, max_layers: int = 40) -> str:
    method = (job.spec.get("method") or {}).get("name", "?")
    ok = job.status == "succeeded" and job.gates_passed is not False
    icon = "✅" if ok else "❌"
    lines = [f"## {icon} Prunery job `{job.id}` — {method}: {job.status}", ""]
    if job.error:
        lines += [f"**{_md(job.error.error)}**: {_md(job.error.detail)}", ""]
    if report is None:
        return "\n".join(lines) + "\n"
    t = report.target
    lines += [
        f"Target: keep **{t.requested}** of the {'MACs' if t.kind == 'flops' else t.kind}; achieved "
        f"**{t.achieved:.4f}** ({'met' if t.met else 'NOT met'}).",
        "",
        "| metric | before | after | change |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {_md(a)} | {b} | {c} | {d} |" for a, b, c, d in summary_rows(report)]
    if report.sweep:
        head, *body = sweep_rows(report)
        lines += ["", "**Budget sweep:**", "", "| " + " | ".join(head) + " |"]
        lines += ["|---|" + "---:|" * (len(head) - 2) + "---|"]
        lines += ["| " + " | ".join(_md(c) for c in r) + " |" for r in body]
        lines += ["", _md(SWEEP_LEGEND)]
    if report.gates:
        lines += ["", "| gate | limit | value | result |", "|---|---:|---:|---|"]
        lines += [
            f"| {g.name} | {g.limit:g} | {g.value:.3f} | {'✅ pass' if g.passed else '❌ MISSED'} |"
            for g in report.gates
        ]
    if report.layers:
        lines += [
            "",
            "<details><summary>Per-layer channels and MACs</summary>",
            "",
            "| layer | channels | MACs before | MACs after |",
            "|---|---:|---:|---:|",
        ]
        for row in report.layers[:max_layers]:
            lines.append(
                f"| `{_md(row.name)}` | {row.channels_before} → {row.channels_after} | "
                f"{_fmt_int(row.macs_before)} | {_fmt_int(row.macs_after)} |"
            )
        if len(report.layers) > max_layers:
            lines.append(f"| … {len(report.layers) - max_layers} more | | | |")
        lines += ["", "</details>"]
    if report.excluded:
        lines += ["", "**Excluded from pruning:**", ""]
        lines += [f"- `{_md(e.name)}`: {_md(e.reason)}" for e in report.excluded]
    if report.notes:
        lines += ["", "**Notes:**", ""] + [f"- {_md(n)}" for n in report.notes]
    return "\n".join(lines) + "\n"


def write(
    job: Any, report: Report | None, junit: str | None, summary: str | None, timed_out: bool = False
) -> list[Path]:
    """Write the requested files; append the summary to $GITHUB_STEP_SUMMARY whenever it is
    set (GitHub Actions sets it in every step)."""
    written: list[Path] = []
    if junit:
        path = Path(junit)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(junit_xml(job, report, timed_out), encoding="utf-8")
        written.append(path)
    text = summary_markdown(job, report)
    if summary:
        path = Path(summary)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    step_summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if step_summary:
        with open(step_summary, "a", encoding="utf-8") as fh:
            fh.write(text + "\n")
        written.append(Path(step_summary))
    return written
