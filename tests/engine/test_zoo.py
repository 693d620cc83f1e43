"""Every zoo model, exported both ways, through `prunery prune` at flops 0.5."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import zoo
from engine.flops import onnx_costs
from engine.load import ort_session
from server_cli import prune as local

pytestmark = pytest.mark.slow

_RESULTS: dict[tuple[str, str, str, tuple[str, ...]], dict] = {}


def _prune(
    zoo_model,
    digits_npz: Path,
    tmp: Path,
    name: str,
    opset: str,
    method: str,
    extra: tuple[str, ...] = (),
) -> dict:
    key = (name, opset, method, extra)
    if key not in _RESULTS:
        out = tmp / f"{name}-{opset}-{method}{'-'.join(('', *extra)).replace('.', '')}"
        code = local.main(
            [
                str(zoo_model(name, opset)),
                "--data",
                str(digits_npz),
                "--method",
                method,
                "--target-flops",
                "0.5",
                "--epochs",
                "3",
                "--out",
                str(out),
                "--quiet",
                "--latency-runs",
                "20",
                # These tests are about budgets and accuracy; the speed gate has its own tests
                # (tests/engine/test_latency.py) and on 8x8 models it would judge widths, not them.
                "--min-speedup",
                "null",
                *extra,
            ]
        )
        assert code == 0, f"prunery prune exited {code}"
        _RESULTS[key] = {"out": out, "report": json.loads((out / "report.json").read_text())}
    return _RESULTS[key]


@pytest.mark.parametrize("opset", ["op17", "opdefault"])
@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_zoo_model_prunes_to_budget(zoo_model, digits_npz, tmp_path_factory, name, opset):
    res = _prune(zoo_model, digits_npz, tmp_path_factory.mktemp("zoo"), name, opset, "l1_norm")
    out, report = res["out"], res["report"]
    files = sorted(p.name for p in out.iterdir())
    assert set(files) - {"model.pt2"} == {
        "analysis.json",
        "model.onnx",
        "report.html",
        "report.json",
        "report.md",
    }
    # model.pt2 is there, or the report says why torch.export could not capture the graph.
    assert "model.pt2" in files or any(n.startswith("no model.pt2") for n in report["notes"])
    pruned = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(pruned, full_check=True)
    original = onnx.load(str(zoo_model(name, opset)))
    x = zoo.digits_arrays()["x_test"][:1]
    # Recount independently of the report: MACs on both graphs.
    kept = (
        onnx_costs(pruned, {pruned.graph.input[0].name: x}).macs
        / onnx_costs(original, {original.graph.input[0].name: x}).macs
    )
    assert abs(kept - 0.5) <= 0.01, kept
    assert report["target"]["met"] and abs(report["target"]["achieved"] - kept) < 1e-6
    assert report["macs"]["after"] < report["macs"]["before"]
    assert report["params"]["after"] < report["params"]["before"]
    assert report["parity"]["max_rel_diff"] <= 1e-4
    acc = report["accuracy"]
    assert 0.0 <= acc["after"] <= 1.0 and acc["samples"] == 360
    assert abs(acc["drop"] - (acc["before"] - acc["after"]) * 100) < 1e-6
    assert {lat["batch_size"] for lat in report["latency_ms"]} == {1, 32}
    assert all(lat["runs"] >= 20 and lat["after"] > 0 for lat in report["latency_ms"])
    # The pruned model really runs at another batch size (dynamic batch) and predicts.
    sess = ort_session(str(out / "model.onnx"))
    xt = zoo.digits_arrays()["x_test"][:7]
    logits = sess.run(None, {sess.get_inputs()[0].name: xt})[0]
    assert logits.shape == (7, 10) and np.isfinite(logits).all()
    assert any(r["channels_after"] < r["channels_before"] for r in report["layers"])
    assert "## Layers" in (out / "report.md").read_text()


def test_l1_norm_beats_random_control(zoo_model, digits_npz, tmp_path_factory):
    """The criterion, all else equal: the same widths (round_to 1, not the widths chosen by
    timing, which vary with the machine's load) and the same learning rate (not one chosen
    per job, which recovers random pruning far better: resnet_bottleneck 18 -> 4 points)."""
    tmp = tmp_path_factory.mktemp("control")
    drops = {"l1_norm": [], "random": []}
    same = ("--round-to", "1", "--lr", "0.001")
    for name in zoo.ZOO:
        for method in drops:
            drops[method].append(
                _prune(zoo_model, digits_npz, tmp, name, "op17", method, same)["report"][
                    "accuracy"
                ]["drop"]
            )
    assert statistics.mean(drops["l1_norm"]) < statistics.mean(drops["random"]), drops


def test_cli_subprocess_exact_form(zoo_model, digits_npz, tmp_path):
    """The documented command line, as a script would run it."""
    exe = Path(sys.executable).with_name("prunery")
    out = tmp_path / "OUTDIR"
    proc = subprocess.run(
        [
            str(exe),
            "prune",
            str(zoo_model("vgg")),
            "--data",
            str(digits_npz),
            "--method",
            "l1_norm",
            "--target-flops",
            "0.5",
            "--epochs",
            "3",
            # The form is under test here, not the speed: vgg's default widths run 0.77x/0.53x
            # (a defect tracked in issue 12), judged or not depending on whether the original
            # crosses the 1 ms floor on the machine. The speed gate has its own tests.
            "--min-speedup",
            "null",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "MACs" in proc.stdout and "Top-1 accuracy" in proc.stdout
    assert (
        (out / "model.onnx").is_file()
        and (out / "report.json").is_file()
        and (out / "report.md").is_file()
    )
