"""What a new user types first: `prunery --help` and `prunery methods`, with no server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PRUNERY_")}
    base["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "sdk")])
    return subprocess.run(
        [sys.executable, "-m", "prunery.cli", *args],
        capture_output=True,
        text=True,
        env={**base, **env},
        cwd=REPO,
        timeout=120,
    )


def test_help_lists_the_local_commands():
    r = _cli("--help")
    assert r.returncode == 0
    for command in ("prune", "analyze", "submit", "serve", "methods", "jobs"):
        assert f"    {command}" in r.stdout, command
    # Each with its one-line description (prune, analyze and serve come from server_cli's
    # entry points; the rest from the SDK).
    described = {
        "prune": "prune an ONNX model locally, no server",
        "analyze": "what can be pruned in a model",
        "serve": "run the embedded server",
        "jobs": "list jobs, newest first: status, progress, method, target, model, times",
        "methods": "list pruning methods",
    }
    flat = " ".join(r.stdout.split())
    for command, text in described.items():
        assert f"{command} {text}" in flat, command


def test_methods_without_a_server(tmp_path):
    r = _cli("methods", "--json", PRUNERY_HOME=str(tmp_path))  # no credentials, no URL
    assert r.returncode == 0, r.stderr
    names = [m["name"] for m in json.loads(r.stdout)]
    assert {"l1_norm", "thinet", "tas"} <= set(names)
    r = _cli("methods", PRUNERY_URL="http://127.0.0.1:9", PRUNERY_API_KEY="pk_x")  # nothing listens
    assert r.returncode == 0 and "l1_norm" in r.stdout and "no server reachable" in r.stderr


def test_methods_into_a_closed_pipe_has_no_traceback(tmp_path):
    """`prunery methods | head -1`: the reader leaves early; no BrokenPipeError traceback.
    The reading end is closed before the CLI writes, so its first write fails."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("PRUNERY_")}
    base["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "sdk")])
    base["PRUNERY_HOME"] = str(tmp_path)
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        r = subprocess.run(
            [sys.executable, "-m", "prunery.cli", "methods"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            env=base,
            cwd=REPO,
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "BrokenPipeError" not in r.stderr
    assert "no server reachable" in r.stderr  # it did run and list the local methods
