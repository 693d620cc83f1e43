"""One code path for artifacts: every file the engine writes (here pruning_from_scratch's
search_curves.png beside model.onnx and the reports) is stored, listed on the job,
downloadable by name, and fetched by `prunery download` — under the same names that
`prunery prune` writes locally for the same spec."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import httpx
import pytest
import servicekit
from e2ekit import spec

pytestmark = pytest.mark.service

PFS = {
    "method": {"name": "pruning_from_scratch", "params": {"gate_epochs": 1}},
    "recovery": {"epochs": 1, "batch_size": 64},
    "gates": {"min_speedup": None},  # not a speed test: the same spec runs locally below
}


def test_service_returns_every_file_prunery_prune_writes(stack, sdk, uploaded, digits, tmp_path):
    job = sdk.jobs.create(spec(uploaded, **PFS))
    job.wait(timeout=400)
    assert job.status == "succeeded", job.error
    assert "search_curves.png" in job.artifacts

    # The same spec through `prunery prune`, no server.
    local = tmp_path / "local"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "prunery.cli",
            "prune",
            str(digits["model"]),
            "--data",
            str(digits["data"]),
            "--method",
            "pruning_from_scratch",
            "--method-param",
            "gate_epochs=1",
            "--epochs",
            "1",
            "--batch-size",
            "64",
            "--target-flops",
            "0.5",
            "--min-speedup",
            "null",
            "--out",
            str(local),
        ],
        capture_output=True,
        text=True,
        cwd=servicekit.REPO,
        timeout=400,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(job.artifacts) == sorted(p.name for p in local.iterdir())

    # Each artifact streams its stored bytes, with their checksum and a fitting type.
    headers = {"Authorization": f"Bearer {stack.api_key}"}
    png = httpx.get(
        f"{stack.url}/v1/jobs/{job.id}/artifacts/search_curves.png", headers=headers, timeout=30
    )
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content.startswith(b"\x89PNG\r\n\x1a\n")
    assert hashlib.sha256(png.content).hexdigest() == png.headers["x-content-sha256"]
    missing = httpx.get(
        f"{stack.url}/v1/jobs/{job.id}/artifacts/nope.bin", headers=headers, timeout=30
    )
    assert missing.status_code == 404 and "search_curves.png" in missing.json()["detail"]

    # `prunery download` fetches them all.
    env = {**os.environ, "PRUNERY_URL": stack.url, "PRUNERY_API_KEY": stack.api_key}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "prunery.cli",
            "download",
            job.id,
            "--out",
            str(tmp_path / "dl"),
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=servicekit.REPO,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(json.loads(r.stdout)) == sorted(job.artifacts)
    assert (tmp_path / "dl" / "search_curves.png").read_bytes() == png.content


def test_eval_dataset_is_used_by_the_worker(sdk, uploaded, digits, tmp_path):
    import numpy as np

    x, y = digits["arrays"]["x_test"][:120], digits["arrays"]["y_test"][:120]
    np.savez(tmp_path / "eval.npz", x=x, y=y)
    ev = sdk.datasets.upload(tmp_path / "eval.npz")
    job = sdk.jobs.create(spec(uploaded, eval_dataset_id=ev.id, recovery={"mode": "none"}))
    job.wait(timeout=400)
    assert job.status == "succeeded", job.error
    report = job.report()
    assert (
        report.evaluation["dataset"] == "evaluation dataset" and report.evaluation["samples"] == 120
    )
    assert report.accuracy.samples == 120
