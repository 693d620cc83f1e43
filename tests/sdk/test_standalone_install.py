"""`pip install ./sdk` in a fresh venv: a working `prunery` client and command, with no
torch, fastapi or sqlalchemy (the SDK is its own distribution: httpx + pydantic)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(*cmd: str | Path, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=600, check=False, **kw
    )


def test_sdk_installs_alone(tmp_path):
    venv = tmp_path / "venv"
    r = _run(sys.executable, "-m", "venv", venv)
    assert r.returncode == 0, r.stderr
    py, prunery = venv / "bin" / "python", venv / "bin" / "prunery"
    r = _run(py, "-m", "pip", "install", "--quiet", REPO / "sdk")
    assert r.returncode == 0, r.stdout + r.stderr
    env = {"PATH": str(venv / "bin"), "HOME": str(tmp_path)}
    r = _run(prunery, "--help", env=env, cwd=tmp_path)
    assert r.returncode == 0 and "submit" in r.stdout, r.stderr
    r = _run(prunery, "prune", "m.onnx", env=env, cwd=tmp_path)
    assert r.returncode == 2 and "pip install 'prunery-server[worker]'" in r.stderr
    probe = (
        "import importlib.util, prunery.client, prunery.cli\n"
        "missing = [m for m in ('torch', 'fastapi', 'sqlalchemy', 'engine', 'app', 'core')"
        " if importlib.util.find_spec(m) is None]\n"
        "print(','.join(missing))\n"
    )
    r = _run(py, "-c", probe, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "torch,fastapi,sqlalchemy,engine,app,core"
