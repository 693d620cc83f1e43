"""The CLI summaries against a real server: `prunery serve` (SQLite, local artifacts, kombu's
filesystem transport, a real Celery worker) runs an l1_norm job on a digits CNN whose layers
live in named containers (`features`, `classifier`), so the engine's names are doubled
(`features/features/0/Conv`). `submit --wait`, `report` and `jobs` are read as a user sees
them."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))

import servicekit  # noqa: E402

from prunery.report_text import display_name  # noqa: E402

pytestmark = pytest.mark.service

DOUBLED = re.compile(r"(?:^|[\s/])([A-Za-z_]\w*)/\1/")


def _digits_cnn(path: Path, arrays: dict[str, np.ndarray]) -> None:
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1),
                nn.BatchNorm2d(16),
                nn.ReLU(),
                nn.Conv2d(16, 32, 3, padding=1),
                nn.BatchNorm2d(32),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(1),
            )
            self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32, 10))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.classifier(self.features(x))

    torch.manual_seed(0)
    model = Net()
    x, y = torch.from_numpy(arrays["x_train"]), torch.from_numpy(arrays["y_train"])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(3):
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    torch.onnx.export(
        model,
        torch.zeros(1, 1, 8, 8),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
    )


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "prunery.cli", *args],
        cwd=servicekit.REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )


def test_summaries_and_jobs_from_a_served_job(tmp_path):
    arrays = servicekit.digits_arrays()
    np.savez(tmp_path / "digits.npz", **arrays)
    _digits_cnn(tmp_path / "features_cnn.onnx", arrays)

    home = tmp_path / "home"
    port = servicekit.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRUNERY_")}
    env["PRUNERY_HOME"] = str(home)
    serve = subprocess.Popen(
        [sys.executable, "-m", "prunery.cli", "serve", "--port", str(port)],
        cwd=servicekit.REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert serve.poll() is None, "prunery serve exited"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)

        r = _cli(
            env,
            "submit",
            str(tmp_path / "features_cnn.onnx"),
            "--data",
            str(tmp_path / "digits.npz"),
            "--method",
            "l1_norm",
            "--target-flops",
            "0.5",
            "--epochs",
            "1",
            "--min-speedup",
            "null",
            "--wait",
            "--layers",
            "1",
            "--timeout",
            "300",
        )
        assert r.returncode == 0, r.stdout + r.stderr
        job_id = r.stdout.split()[0]
        assert job_id.startswith("job_"), r.stdout
        report = json.loads(_cli(env, "report", job_id, "--json").stdout)
        names = [row["name"] for row in report["layers"]]
        assert any(DOUBLED.search(n) for n in names), names  # the engine's names are doubled
        text = r.stdout
        # The per-layer table, capped at --layers 1, and where the rest is.
        assert f"layers: the 1 of {len(names)} with the biggest MAC change" in text
        # Which layers the budget leaves unchanged depends on the widths the whole-network
        # timing kept, so the line's count of unchanged layers is read from the report.
        hidden = len(names) - 1
        unchanged = sum(
            1
            for row in report["layers"]
            if (row["macs_before"], row["channels_before"])
            == (row["macs_after"], row["channels_after"])
        )
        assert (
            f"... {hidden} more layer{'s' if hidden != 1 else ''} ("
            + (f"{unchanged} unchanged; " if unchanged else "")
            + f"`prunery report {job_id} --layers all` lists them"
        ) in text, text
        # Shown by the exporter's source module path (report.json keeps the engine's names).
        assert "layers shown by their source module path" in text
        assert "features.0" in text or "features.3" in text
        assert not DOUBLED.search(text), text
        # Excluded layers with their reasons, and the notes.
        assert f"excluded from pruning ({len(report['excluded'])}):" in text
        joined = text.replace("\n    ", " ")  # bullets wrap onto indented lines
        for excluded in report["excluded"]:
            shown = excluded.get("source") or display_name(excluded["name"])
            assert f"{shown}: {excluded['reason'][:40]}" in joined
        assert "classifier.1: " in text  # the output layer, by its torch module path
        assert "notes:" in text
        for note in report["notes"]:
            assert note[:40] in joined, note
        assert "reasons in report.md" not in text

        full = _cli(env, "report", job_id, "--layers", "all")
        assert full.returncode == 0, full.stderr
        assert f"layers ({len(names)}):" in full.stdout and "more layers" not in full.stdout
        for row in report["layers"]:
            ch = f"{row['channels_before']} -> {row['channels_after']}"
            line = next(
                ln
                for ln in full.stdout.splitlines()
                if ln.split()[:1] == [row.get("source") or display_name(row["name"])]
            )
            assert ch in line and row["op"] in line

        jobs = _cli(env, "jobs")
        assert jobs.returncode == 0, jobs.stderr
        header, _rule, row = jobs.stdout.splitlines()[:3]
        assert header.split() == [
            "id",
            "status",
            "progress",
            "method",
            "target",
            "model",
            "created",
            "ran",
            "for",
        ]
        for cell in (job_id, "succeeded", "100%", "l1_norm", "MACs 0.5", "features_cnn.onnx"):
            assert cell in row, (cell, row)
        assert re.search(r"\d+s$", row.rstrip()), row  # how long it ran
        listed = json.loads(_cli(env, "jobs", "--json").stdout)
        assert [j["id"] for j in listed["data"]] == [job_id] and listed["count"] == 1
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(timeout=40)
        finally:
            if serve.poll() is None:
                os.killpg(serve.pid, signal.SIGKILL)
