"""Every registered method on a CUDA device, through the whole engine, on one zoo model per
structural family (residual, depthwise, concat, Linear) — what production's GPU workers run.

Marked `gpu`: skipped where CUDA is unavailable (CPU-only CI), run with `make test-gpu` on a
machine with a GPU. The CPU-side guard for the same class of bug (tensors a method creates on
the wrong device) is tests/test_device_placement.py."""

from __future__ import annotations

import onnx
import pytest
import torch

import zoo
from core.errors import BadSpec
from core.validation import onnx_checks as checks
from engine import run
from methods import registry
from prunery.spec import JobSpec

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="CUDA is not available on this machine"
    ),
]

# Short schedules: the mechanisms are tested elsewhere; here each must run end to end on CUDA.
FAST: dict[str, dict] = {
    "network_slimming": {"sparsity_epochs": 1},
    "pruning_from_scratch": {"gate_epochs": 2},
    "tas": {"search_epochs": 1},
    "anp": {"mask_epochs": 1, "pgd_steps": 2, "eval_pgd_steps": 3},
    "sanp": {"epochs": 2},
    "flop": {"epochs": 1},
}
FAMILIES = ("resnet_basic", "mobilenet_v2", "densenet", "mixer")
# Low-rank methods factorise hidden Linear layers (the conv zoo has only its classifier);
# SANP gates convolution channels (the mixer's only conv, the patch embedding, is coupled
# to its token-mixing reshapes and excluded).
ONLY = {"flop": ("mixer",), "svd": ("mixer",), "sanp": ("resnet_basic", "mobilenet_v2", "densenet")}


def _cases() -> list[tuple[str, str]]:
    return [
        (info.name, family)
        for info in registry.list_methods()
        if "classification" in info.tasks
        for family in ONLY.get(info.name, FAMILIES)
    ]


@pytest.mark.parametrize(("method", "name"), _cases())
def test_method_runs_on_cuda(method, name, zoo_model, digits_npz, tmp_path):
    path = zoo_model(name)
    try:
        registry.check_applicable(
            method, checks.summarize(onnx.load(str(path)), path.stat().st_size), "classification"
        )
    except BadSpec as exc:
        pytest.skip(f"{method} does not apply to {name}: {exc}")
    spec = JobSpec(
        method={"name": method, "params": FAST.get(method, {})},
        target={"flops": 0.5},
        recovery={"epochs": 1},
    )
    report = run(
        spec, path, digits_npz, tmp_path / "out", device="cuda", latency_runs=3, catalog=registry
    )
    assert report.device.startswith("cuda"), report.device
    assert report.target.met, report.target
    assert report.parity["max_rel_diff"] <= 1e-4
    assert report.accuracy is not None
    if report.recovery["mode_used"] == "scratch":  # re-initialised, 1 epoch: only a valid number
        assert 0.0 <= report.accuracy.after <= 1.0
    else:
        assert report.accuracy.after > 0.1
    assert (tmp_path / "out" / "model.onnx").is_file()


def test_language_model_methods_on_cuda(tmp_path):
    """flop and l1_norm on the character transformer (the export path that used a private
    torch attribute), on CUDA."""
    path, _ = zoo.build_lm_model(zoo.default_cache_dir())
    data = zoo.write_text_npz(tmp_path / "text.npz")
    for method, params in (("flop", {"epochs": 1}), ("l1_norm", {})):
        spec = JobSpec(
            task="language_modeling",
            method={"name": method, "params": params},
            target={"params": 0.6},
            recovery={"epochs": 1},
        )
        report = run(
            spec, path, data, tmp_path / method, device="cuda", latency_runs=3, catalog=registry
        )
        assert report.device.startswith("cuda") and report.target.met
        assert report.metrics and report.metrics["bits_per_token"].after > 0
