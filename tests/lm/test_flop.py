"""FLOP (factorised L0 pruning) and the language-modelling task."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import zoo
from engine import graph, run, train
from engine.flops import torch_costs
from engine.method import PruneContext
from methods import registry
from methods.flop import FlopParams
from methods.flop.impl import FactorizedLinear, Flop
from prunery.spec import JobSpec


def test_factorisation_starts_from_the_trained_function():
    torch.manual_seed(0)
    lin = nn.Linear(24, 40)
    fact = FactorizedLinear(lin).eval()
    x = torch.randn(5, 7, 24)
    torch.testing.assert_close(fact(x), lin(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (64, 8)])
def test_compiled_equals_masked(shape):
    torch.manual_seed(1)
    fact = FactorizedLinear(nn.Linear(*shape))
    with torch.no_grad():
        fact.log_alpha.normal_()
    keep = torch.tensor([0, 2, 3, 5])
    fact.keep.zero_()
    fact.keep[keep] = 1.0
    fact.eval()
    x = torch.randn(9, shape[0])
    compiled = fact.compile(keep)
    assert isinstance(compiled, nn.Sequential) == (4 * sum(shape) < shape[0] * shape[1])
    torch.testing.assert_close(compiled(x), fact(x), atol=1e-5, rtol=1e-5)


def test_expected_l0_is_the_probability_of_a_nonzero_gate():
    torch.manual_seed(0)
    fact = FactorizedLinear(nn.Linear(16, 16))
    with torch.no_grad():
        fact.log_alpha.uniform_(-3, 3)
    fact.train()
    samples = torch.stack([fact.gates() for _ in range(4000)])
    empirical = (samples > 0).float().mean(0)
    torch.testing.assert_close(empirical, fact.expected_l0().detach(), atol=0.03, rtol=0)


def _mlp_context(target: float) -> tuple[PruneContext, nn.Module]:
    torch.manual_seed(0)
    d = zoo.digits_arrays()
    data = train.TensorData(
        *(torch.from_numpy(d[k]) for k in ("x_train", "y_train", "x_test", "y_test"))
    )
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 128),
        nn.ReLU(),
        nn.Linear(128, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )
    train.train(model, data, epochs=3, lr=3e-3, device=torch.device("cpu"))
    x = data.x_train[:1]
    spec = JobSpec(method={"name": "flop"}, target={"params": target})
    ctx = PruneContext(
        spec=spec,
        model=model,
        example=x,
        calibration=data.x_train[:64],
        data=data,
        analysis=graph.Analysis([], [], []),
        base_costs=torch_costs(model, x),
        device=torch.device("cpu"),
        seed=0,
        progress=lambda f, m: None,
    )
    return ctx, model


def test_lagrangian_reaches_the_target_sparsity():
    ctx, _ = _mlp_context(0.4)
    method = Flop(FlopParams(epochs=8))
    model = ctx.copy_model()
    layers = method.factorize(ctx, model)
    assert [layer.name for layer in layers] == ["1", "3"]  # the output layer is not factorised
    t = method.target_sparsity(ctx, layers)
    curve = method.train_gates(ctx, model, layers, t)
    assert abs(curve[-1]["expected_sparsity"] - t) <= 0.02, curve
    assert curve[-1]["lambda2"] > 0


def test_selection_meets_the_budget_and_compiles_two_dense_layers():
    ctx, original = _mlp_context(0.4)
    result = Flop(FlopParams(epochs=2)).run(ctx)
    kept = torch_costs(result.model, ctx.example).params / ctx.base_costs.params
    assert abs(kept - 0.4) <= 0.01
    assert any(isinstance(m, nn.Sequential) and len(m) == 2 for m in result.model.modules())
    assert result.details["curve"] and set(result.details["ranks"]) == {"1", "3"}


@pytest.fixture(scope="module")
def text_npz(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.npz"
    arrays = zoo.text_arrays(n_train=800, n_test=200)
    np.savez(path, **arrays)
    return path


@pytest.mark.slow
def test_flop_on_the_character_transformer(text_npz, tmp_path):
    model_path, _ = zoo.build_lm_model(zoo.default_cache_dir())
    spec = JobSpec(
        task="language_modeling",
        method={"name": "flop", "params": {"epochs": 1}},
        target={"params": 0.6},
        recovery={"epochs": 1},
    )
    report = run(spec, model_path, text_npz, tmp_path / "out", latency_runs=20, catalog=registry)
    assert report.target.met and abs(report.target.achieved - 0.6) <= 0.01
    assert report.accuracy is None
    bpt = report.metrics["bits_per_token"]
    assert 0 < bpt.before < 7 and 0 < bpt.after < 7  # log2(128) = 7 would be chance
    assert report.metrics["perplexity"].after == pytest.approx(2**bpt.after, rel=1e-6)
    assert report.parity["max_rel_diff"] <= 1e-4
    assert any("rank" in row.op for row in report.layers)


@pytest.mark.slow
def test_l1_norm_on_the_language_model(text_npz, tmp_path):
    model_path, _ = zoo.build_lm_model(zoo.default_cache_dir())
    spec = JobSpec(
        task="language_modeling",
        method={"name": "l1_norm"},
        target={"flops": 0.7},
        recovery={"epochs": 1},
    )
    report = run(spec, model_path, text_npz, tmp_path / "out", latency_runs=20, catalog=registry)
    assert report.target.met
    assert any("Reshape" in e.reason for e in report.excluded)  # attention heads are reshape-bound


@pytest.mark.slow
def test_flop_on_a_classification_zoo_model(zoo_model, digits_npz, tmp_path):
    spec = JobSpec(
        method={"name": "flop", "params": {"epochs": 1}},
        target={"params": 0.6},
        recovery={"epochs": 1},
    )
    report = run(
        spec, zoo_model("mixer"), digits_npz, tmp_path / "out", latency_runs=20, catalog=registry
    )
    assert report.target.met and report.accuracy is not None


def test_flop_is_not_applicable_without_linear_layers():
    from core.errors import NotApplicable
    from core.validation.onnx_checks import ModelSummary

    summary = ModelSummary(
        opset=17,
        inputs=[],
        outputs=[],
        op_histogram={"Conv": 3, "Relu": 3},
        parameter_count=10,
        file_bytes=10,
    )
    with pytest.raises(NotApplicable, match="no Gemm or MatMul"):
        registry.check_applicable("flop", summary, "classification")


def test_truncated_svd_baseline_meets_the_budget():
    ctx, _ = _mlp_context(0.4)
    from methods.svd import SvdParams
    from methods.svd.impl import TruncatedSVD

    result = TruncatedSVD(SvdParams()).run(ctx)
    kept = torch_costs(result.model, ctx.example).params / ctx.base_costs.params
    assert abs(kept - 0.4) <= 0.01
    ranks = result.details["ranks"]
    fractions = [r["kept"] / r["full"] for r in ranks.values()]
    assert max(fractions) - min(fractions) <= 0.1  # the same rank fraction per layer
