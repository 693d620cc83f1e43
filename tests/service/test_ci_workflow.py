"""examples/github-actions.yml, run for real: every `run:` step's commands, in order, with
bash as GitHub runs them, against `prunery serve` (the workflow starts it when no
PRUNERY_URL secret is set). Steps that are actions (`uses:`) and the pip install are what
the runner provides; here the test's environment already has Prunery installed."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import servicekit
import yaml

pytestmark = pytest.mark.service

WORKFLOW = servicekit.REPO / "examples" / "github-actions.yml"
PROVIDED_BY_THE_RUNNER = {"Install Prunery"}


def _condition(expr: str | None, env: dict[str, str]) -> bool:
    """The few expression forms the workflow uses: always(), env.X == '' and &&."""
    if expr is None:
        return True
    py = expr.replace("always()", "True").replace("&&", " and ")
    py = re.sub(r"env\.(\w+)\s*==\s*''", lambda m: repr(env.get(m.group(1), "") == ""), py)
    assert re.fullmatch(r"[\sA-Za-z()]*", py), f"unsupported condition {expr!r}"
    return bool(eval(py, {"__builtins__": {}}))  # noqa: S307 — our own file, checked above


def _expand(value: str) -> str:
    # Secrets are absent here (no PRUNERY_URL): the workflow then serves locally.
    value = re.sub(r"\$\{\{\s*secrets\.\w+\s*\}\}", "", str(value))
    assert "${{" not in value, f"unsupported expression in {value!r}"
    return value


def test_github_actions_workflow_steps_run_against_prunery_serve(zoo_model, digits_npz, tmp_path):
    workflow = yaml.safe_load(WORKFLOW.read_text())
    job = workflow["jobs"]["prune"]
    work = tmp_path / "checkout"
    (work / "models").mkdir(parents=True)
    (work / "data").mkdir()
    job_env = {k: _expand(v) for k, v in job["env"].items()}
    # About the workflow, not speed: vgg on 8x8 digits runs in ~40 µs at batch 1, where a
    # 1 µs difference decides the speed gate (tests/engine/test_latency.py owns that gate).
    assert job_env["PRUNE_FLAGS"] == ""
    job_env["PRUNE_FLAGS"] = "--min-speedup null"
    # The repository's model and data, where the workflow expects them.
    (work / job_env["MODEL"]).write_bytes(zoo_model("vgg").read_bytes())
    (work / job_env["DATA"]).write_bytes(digits_npz.read_bytes())
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "prunery").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m prunery.cli "$@"\n')
    (shim / "prunery").chmod(0o755)
    step_summary = tmp_path / "github-step-summary.md"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRUNERY_")}
    env.update(job_env)
    env.update(
        PATH=f"{shim}:{env['PATH']}",
        PYTHONPATH=os.pathsep.join(
            [str(servicekit.REPO), str(servicekit.REPO / "sdk"), env.get("PYTHONPATH", "")]
        ),
        GITHUB_STEP_SUMMARY=str(step_summary),
        CI="true",
        GITHUB_ACTIONS="true",
    )
    ran: list[str] = []
    groups: list[int] = []
    try:
        for step in job["steps"]:
            name = step.get("name") or step.get("uses")
            if "uses" in step or name in PROVIDED_BY_THE_RUNNER:
                continue
            if not _condition(step.get("if"), env):
                continue
            proc = subprocess.Popen(
                ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]],
                cwd=work,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
            groups.append(proc.pid)
            out, _ = proc.communicate(timeout=600)
            assert proc.returncode == 0, f"step {name!r} exited {proc.returncode}:\n{out[-4000:]}"
            ran.append(name)
    finally:
        for pgid in groups:  # whatever a step left running (the server, if a step failed)
            try:
                os.killpg(pgid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    assert ran == [
        "Start a local Prunery server",
        "Prune and gate on accuracy",
        "Stop the local server",
    ]

    suite = ET.parse(work / "prunery-junit.xml").getroot().find("testsuite")
    cases = {c.get("name"): c for c in suite.findall("testcase")}
    assert "gate max_accuracy_drop" in cases and "target flops" in cases
    assert any(n.startswith("job job_") for n in cases)
    assert suite.get("failures") == "0" and suite.get("errors") == "0"
    assert "limit 1" in cases["gate max_accuracy_drop"].find("system-out").text
    summary = (work / "prunery-summary.md").read_text()
    assert "| metric | before | after | change |" in summary and "max_accuracy_drop" in summary
    assert step_summary.read_text().strip() == summary.strip()
    assert (work / "pruned" / "model.onnx").is_file() and (
        work / "pruned" / "report.html"
    ).is_file()
    assert (work / ".prunery-ci" / "credentials.json").is_file()


def test_gitlab_job_mirrors_the_github_workflow():
    gitlab = yaml.safe_load((servicekit.REPO / "examples" / "gitlab-ci.yml").read_text())[
        "prune-gate"
    ]
    github = yaml.safe_load(WORKFLOW.read_text())["jobs"]["prune"]
    submit_gh = next(
        s["run"] for s in github["steps"] if s.get("name") == "Prune and gate on accuracy"
    )
    submit_gl = next(line for line in gitlab["script"] if line.startswith("prunery submit"))
    assert submit_gl.split() == submit_gh.replace("\\\n", " ").split()
    assert gitlab["artifacts"]["reports"]["junit"] == "prunery-junit.xml"
