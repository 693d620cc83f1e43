"""A budget sweep through the service: one job, one downloadable model per point (stored
as `<point>__model.onnx`), the sweep table in the report, and the same files as
`prunery prune` writes locally for the same spec."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import servicekit
from e2ekit import spec

pytestmark = pytest.mark.service

SWEEP = {
    "target": {"flops": [0.75, 0.5]},
    "recovery": {"mode": "none"},
    "gates": {"min_speedup": None},  # not a speed test
}


def test_sweep_job_point_models_are_downloadable(stack, sdk, uploaded, digits, tmp_path):
    job = sdk.jobs.create(spec(uploaded, **SWEEP))
    job.wait(timeout=400)
    assert job.status == "succeeded", job.error
    report = job.report()
    assert report.sweep is not None and [p.label for p in report.sweep] == [
        "flops-0.75",
        "flops-0.5",
    ]
    x, y = digits["arrays"]["x_test"].astype(np.float32), digits["arrays"]["y_test"]
    headers = {"Authorization": f"Bearer {stack.api_key}"}
    for point, requested in zip(report.sweep, [0.75, 0.5], strict=True):
        assert abs(point.target.achieved - requested) <= 0.01 and point.target.met
        # The SDK names the point's files; they are listed on the job and download.
        names = job.sweep_artifacts(requested, ("model.onnx", "report.json"))
        assert names == [point.artifacts["model.onnx"], point.artifacts["report.json"]]
        assert job.sweep_artifacts(point.label) == [point.artifacts["model.onnx"]]
        paths = job.download(tmp_path / point.label, names)
        sess = ort.InferenceSession(str(paths[names[0]]), providers=["CPUExecutionProvider"])
        logits = sess.run(None, {sess.get_inputs()[0].name: x})[0]
        assert abs(float((logits.argmax(1) == y).mean()) - point.accuracy) < 1e-9
        # Streamed over HTTP with the stored checksum.
        r = httpx.get(
            f"{stack.url}/v1/jobs/{job.id}/artifacts/{names[0]}", headers=headers, timeout=30
        )
        assert r.status_code == 200
        assert hashlib.sha256(r.content).hexdigest() == r.headers["x-content-sha256"]
        assert r.content == paths[names[0]].read_bytes()
    with pytest.raises(ValueError, match="flops-0.75, flops-0.5|flops-0.5, flops-0.75"):
        job.sweep_artifacts(0.3)
    # The job's own model.onnx is the selected point's (every gate passed: the fewest MACs).
    chosen = next(p for p in report.sweep if p.selected)
    assert chosen.label == "flops-0.5" and job.gates_passed
    top = job.download(tmp_path / "top", ["model.onnx"])["model.onnx"]
    assert (
        top.read_bytes() == (tmp_path / "flops-0.5" / chosen.artifacts["model.onnx"]).read_bytes()
    )

    # The same spec through `prunery prune`: the service stores every file it writes.
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
            "l1_norm",
            "--recovery",
            "none",
            "--target-flops",
            "0.75,0.5",
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
    assert "budget sweep (2 points)" in r.stdout
    assert sorted(job.artifacts) == sorted(p.name for p in local.iterdir())
