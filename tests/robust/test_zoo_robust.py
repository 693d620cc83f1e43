"""ANP and SANP through the whole engine on every conv zoo model at flops 0.5 (1 epoch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import zoo
from engine import run
from engine.flops import onnx_costs
from engine.load import ort_session
from methods import registry
from prunery.spec import JobSpec

pytestmark = pytest.mark.slow

CONV_MODELS = zoo.test_zoo(conv_only=True)
# Short schedules so the suite stays in minutes on two cores; the mechanisms are the same.
# SANP gets 3 joint epochs: after 1 its policy is still near "keep all" and the calibrated
# threshold alone (a global shift) can leave a layer nearly closed.
FAST = {
    "anp": {"mask_epochs": 1, "pgd_steps": 2, "eval_pgd_steps": 3},
    "sanp": {"epochs": 3},
}
SANP_TOLERANCE = 0.02


def _run(method: str, name: str, zoo_model, digits_npz: Path, out: Path):
    spec = JobSpec(
        method={"name": method, "params": FAST[method]},
        target={"flops": 0.5},
        recovery={"epochs": 1},
    )
    report = run(spec, zoo_model(name), digits_npz, out, latency_runs=5, catalog=registry)
    pruned = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(pruned, full_check=True)
    assert report.parity["max_rel_diff"] <= 1e-4
    sess = ort_session(str(out / "model.onnx"))
    x = zoo.digits_arrays()["x_test"][:7]
    logits = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    assert logits.shape == (7, 10) and np.isfinite(logits).all()
    return report, pruned


@pytest.mark.parametrize("name", CONV_MODELS)
def test_anp_prunes_to_budget_and_reports_robustness(name, zoo_model, digits_npz, tmp_path):
    report, pruned = _run("anp", name, zoo_model, digits_npz, tmp_path / "out")
    original = onnx.load(str(zoo_model(name)))
    x = zoo.digits_arrays()["x_test"][:1]
    kept = (
        onnx_costs(pruned, {pruned.graph.input[0].name: x}).macs
        / onnx_costs(original, {original.graph.input[0].name: x}).macs
    )
    assert abs(kept - 0.5) <= 0.01, kept
    assert report.target.met and report.params.after < report.params.before
    rob = report.robustness
    assert rob is not None and rob["samples"] == 360
    for side in ("original", "pruned"):
        acc = rob[side]
        assert set(acc) == {"clean", "fgsm", "pgd"} and all(0.0 <= v <= 1.0 for v in acc.values())
        assert acc["pgd"] <= acc["clean"] + 1e-9
    assert rob["pruned"]["clean"] == pytest.approx(
        report.accuracy.after, abs=0.01
    )  # torch vs onnxruntime
    pgd = rob["attacks"]["pgd"]
    assert (
        pgd["epsilon"] == pytest.approx(0.03 * (pgd["hi"] - pgd["lo"]), rel=1e-4)
        and pgd["steps"] == 3
    )
    details = report.method_details
    assert details["channels_removed"] > 0 and "channels_below_threshold" in details
    assert len(details["mask_training"]) == 1 and details["mask_training"][0]["kl"] > 0


@pytest.mark.parametrize("name", CONV_MODELS)
def test_sanp_meets_the_average_macs_budget_with_gates_in_the_graph(
    name, zoo_model, digits_npz, tmp_path
):
    report, pruned = _run("sanp", name, zoo_model, digits_npz, tmp_path / "out")
    dyn = report.dynamic
    assert dyn is not None and dyn["samples"] == 360
    # The achieved figure is the measured mean over the test split, near the budget.
    assert report.target.achieved == pytest.approx(dyn["macs_mean"] / report.macs.before, rel=1e-6)
    assert abs(report.target.achieved - 0.5) <= SANP_TOLERANCE, dyn
    assert dyn["macs_min"] <= dyn["macs_mean"] <= dyn["macs_max"] and dyn["macs_std"] > 0
    # The exported graph computes everything and gates it: its static MACs are the full
    # network plus the modules, counted the same by torch and on the ONNX graph.
    assert report.macs.after >= report.macs.before
    assert dyn["macs_static"] == pytest.approx(report.macs.after, rel=1e-3)
    ops = {n.op_type for n in pruned.graph.node}
    assert {"Greater", "Mul"} <= ops, ops
    assert report.accuracy.after > 0.5
