"""Both learned-architecture methods through the whole engine over the zoo at flops 0.5:
valid, parity-checked ONNX within 1% of the budget, with the searched widths and curves
in the report and the plot next to the model."""

from __future__ import annotations

import onnx
import pytest

import zoo
from engine import run
from engine.flops import onnx_costs
from methods import registry
from prunery.spec import JobSpec

pytestmark = pytest.mark.slow

# Short searches: the mechanisms are tested in the unit tests; here every architecture
# family must come out as a valid, budget-exact network.
PARAMS = {"pruning_from_scratch": {"gate_epochs": 2}, "tas": {"search_epochs": 1}}


@pytest.mark.parametrize("method", list(PARAMS))
@pytest.mark.parametrize("name", zoo.test_zoo())
def test_learned_method_prunes_zoo_model(zoo_model, digits_npz, tmp_path, name, method):
    spec = JobSpec(
        method={"name": method, "params": PARAMS[method]},
        target={"flops": 0.5},
        recovery={"epochs": 1},
    )
    out = tmp_path / "out"
    report = run(spec, zoo_model(name), digits_npz, out, latency_runs=5, catalog=registry)
    assert report.target.met, report.target
    assert abs(report.target.achieved - 0.5) <= 0.01
    assert report.parity["max_rel_diff"] <= 1e-4
    pruned = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(pruned, full_check=True)
    original = onnx.load(str(zoo_model(name)))
    x = zoo.digits_arrays()["x_test"][:1]
    kept = (
        onnx_costs(pruned, {pruned.graph.input[0].name: x}).macs
        / onnx_costs(original, {original.graph.input[0].name: x}).macs
    )
    assert abs(kept - 0.5) <= 0.01, kept
    details = report.method_details
    assert any(w["channels_after"] < w["channels_before"] for w in details["widths"])
    assert details["search_curves"]
    assert (out / "search_curves.png").read_bytes()[:4] == b"\x89PNG"
    if method == "pruning_from_scratch":
        assert report.recovery["mode_used"] == "scratch"
    else:
        assert any("distilled" in n for n in report.notes)
        assert all("searched" in w for w in details["widths"])
