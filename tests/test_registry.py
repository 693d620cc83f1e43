"""Every registered method, tested the moment it is registered (timm-style)."""

from __future__ import annotations

import json

import pytest

from core.errors import BadSpec
from engine import run
from methods import registry
from prunery.spec import JobSpec

METHODS = [m.name for m in registry.list_methods()]
# Low-rank methods factorise Linear layers, which hold ~1% of vgg's MACs: give them the
# zoo's MLP-mixer instead.
MODEL_FOR = {"flop": "mixer", "svd": "mixer"}


def test_unknown_method_names_the_known_ones():
    with pytest.raises(BadSpec) as err:
        registry.get_method("no_such_method")
    for name in METHODS:
        assert name in str(err.value)


@pytest.mark.parametrize("name", METHODS)
def test_method_metadata(name):
    info = registry.get_method(name)
    described = info.describe()
    assert described["name"] == name and described["paper"] and described["summary"]
    json.dumps(described["params_schema"])  # serialisable JSON schema
    info.params()  # defaults are valid
    with pytest.raises(BadSpec):
        registry.validate_params(name, {"definitely_not_a_param": 1})


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_method_prunes_a_zoo_model(name, zoo_model, digits_npz, tmp_path):
    info = registry.get_method(name)
    if "classification" not in info.tasks:
        pytest.skip(f"{name} is for {info.tasks}")
    spec = JobSpec(method={"name": name}, target={"flops": 0.5}, recovery={"epochs": 1})
    report = run(
        spec,
        zoo_model(MODEL_FOR.get(name, "vgg")),
        digits_npz,
        tmp_path / "out",
        latency_runs=20,
        catalog=registry,
    )
    assert report.target.met, report.target
    assert report.parity["max_rel_diff"] <= 1e-4
    assert (tmp_path / "out" / "model.onnx").is_file()
