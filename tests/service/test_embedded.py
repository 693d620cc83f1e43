"""`prunery serve`: the embedded default (SQLite, local artifacts, kombu filesystem
transport) runs the same task code; the CLI finds the server through the credentials file."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest
import servicekit

pytestmark = pytest.mark.service


def test_prunery_serve_runs_a_job_with_no_servers(digits, tmp_path):
    home = tmp_path / "home"
    port = servicekit.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRUNERY_")}
    env["PRUNERY_HOME"] = str(home)
    serve = subprocess.Popen(
        [sys.executable, "-m", "prunery.cli", "serve", "--port", str(port)],
        cwd=servicekit.REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert serve.poll() is None, serve.stdout.read().decode()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        creds = json.loads((home / "credentials.json").read_text())
        assert creds["url"] == f"http://127.0.0.1:{port}" and creds["api_key"].startswith("pk_")
        assert oct((home / "credentials.json").stat().st_mode & 0o777) == "0o600"

        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "prunery.cli",
                "submit",
                str(digits["model"]),
                "--data",
                str(digits["data"]),
                "--method",
                "l1_norm",
                "--target-flops",
                "0.5",
                "--epochs",
                "1",
                "--min-speedup",
                "null",  # not a speed test
                "--wait",
                "--json",
                "--out",
                str(tmp_path / "out"),
                "--timeout",
                "300",
            ],
            cwd=servicekit.REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        out = json.loads(r.stdout)
        assert out["job"]["status"] == "succeeded"
        assert out["report"]["target"]["met"] is True
        assert (tmp_path / "out" / "model.onnx").is_file()
        # Everything lives under PRUNERY_HOME: SQLite, artifacts, the broker folder.
        assert (home / "prunery.db").is_file()
        assert any((home / "artifacts" / "tenants").rglob("model.onnx"))
        assert (home / "broker" / "queue").is_dir()
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(timeout=40)
        finally:
            if serve.poll() is None:
                os.killpg(serve.pid, signal.SIGKILL)
    # serve stopped its worker (its own process group) too.
    printed = serve.stdout.read().decode()
    match = re.search(r"worker pid (\d+)", printed)
    assert match, printed
    time.sleep(1)
    with pytest.raises(ProcessLookupError):
        os.killpg(int(match.group(1)), 0)
