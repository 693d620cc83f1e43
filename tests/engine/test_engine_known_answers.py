"""Known answers: a zero filter goes first; a constant Reshape is excluded, not broken;
budgets by params, per-layer ratios and round_to; Scratch-B epochs."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import zoo
from engine import budget, graph, load, run
from engine.method import PruneContext
from methods import registry
from methods.l1_norm import L1NormParams
from methods.l1_norm.impl import L1Norm
from prunery.spec import JobSpec


def _export(model: nn.Module, path: Path) -> Path:
    buf = io.BytesIO()
    torch.onnx.export(
        model.eval(),
        (torch.randn(2, 1, 8, 8),),
        buf,
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        dynamic_axes={"input": {0: "batch"}},
    )
    path.write_bytes(buf.getvalue())
    return path


def _vgg_with_dead_filter(dead: int) -> nn.Module:
    torch.manual_seed(0)
    model = zoo.vgg().eval()
    conv = model[1][0]  # second conv (32 filters), BN follows and folds into it on export
    bn = model[1][1]
    with torch.no_grad():
        conv.weight[dead] = 0.0
        bn.bias[dead] = 0.0
        bn.running_mean[dead] = 0.0
    return model


def test_zero_l1_filter_is_removed_first(tmp_path, digits_npz):
    dead = 13
    path = _export(_vgg_with_dead_filter(dead), tmp_path / "dead.onnx")
    loaded = load.load(path, (1, 8, 8))
    x = torch.from_numpy(zoo.digits_arrays()["x_test"][:16])
    analysis = graph.analyse(loaded.module, x[:1], x)
    dg = graph.build_dependency_graph(loaded.module, x[:1])
    root = next(g for g in analysis.groups if g.name == "1/1/0/Conv")
    from methods.base.scoring import filter_l1

    scores = graph.channel_scores(loaded.module, dg, root.name, filter_l1)
    assert int(torch.argmin(scores)) == dead and scores[dead] == 0.0
    for allocation in ("uniform", "global"):
        chunks = budget.removal_order(
            analysis.groups,
            {
                g.name: graph.channel_scores(loaded.module, dg, g.name, filter_l1)
                for g in analysis.groups
            },
            allocation,
        )
        first_of_group = next(c for c in chunks if c.group == root.name)
        assert first_of_group.idxs == [dead]
        if allocation == "global":
            assert chunks[0].idxs == [dead] and chunks[0].group == root.name
    # End to end: remove one channel of that layer, no recovery — nothing changes.
    spec = JobSpec(
        method={"name": "l1_norm"},
        target={"layers": {"1/1/0/Conv": 1 / 32}},
        recovery={"mode": "none"},
    )
    report = run(spec, path, digits_npz, tmp_path / "out", latency_runs=20, catalog=registry)
    row = next(r for r in report.layers if r.name == "1/1/0/Conv")
    assert (row.channels_before, row.channels_after) == (32, 31)
    assert report.accuracy.after == report.accuracy.before
    sess_a, sess_b = (
        load.ort_session(str(path)),
        load.ort_session(str(tmp_path / "out" / "model.onnx")),
    )
    xt = zoo.digits_arrays()["x_test"][:64]
    np.testing.assert_allclose(
        sess_a.run(None, {"input": xt})[0], sess_b.run(None, {"input": xt})[0], atol=1e-4
    )


class ConstantReshape(nn.Module):
    """conv3's channel count is baked into a constant Reshape that regroups channels (16 x 64
    -> 8 x 128, so no dimension passes through); conv2's is not."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 16, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x))))))
        x = x.reshape(-1, 8, 128).mean(-1)  # exported as Reshape with constant [-1, 8, 128]
        return self.fc(x)


def test_constant_reshape_is_excluded_not_broken(tmp_path, digits_npz):
    torch.manual_seed(0)
    path = _export(ConstantReshape(), tmp_path / "reshape.onnx")
    m = onnx.load(str(path))
    assert "Reshape" in {n.op_type for n in m.graph.node}
    # round_to=1: this test is about the exclusion; measured widths would move the 0.8 cut elsewhere.
    spec = JobSpec(
        method={"name": "l1_norm"},
        target={"flops": 0.8},
        recovery={"epochs": 1},
        export={"round_to": 1},
    )
    report = run(spec, path, digits_npz, tmp_path / "out", latency_runs=20, catalog=registry)
    excluded = {e.name: e.reason for e in report.excluded}
    assert any("Reshape" in reason for reason in excluded.values()), excluded
    rows = {r.name.split("/")[0]: r for r in report.layers}
    assert rows["conv3"].channels_after == 16  # the reshape-bound width is untouched
    assert any(name.startswith("conv3") for name in excluded)
    assert rows["conv2"].channels_after < 32
    assert report.target.met
    sess = load.ort_session(str(tmp_path / "out" / "model.onnx"))
    out = sess.run(None, {"input": zoo.digits_arrays()["x_test"][:5]})[0]
    assert out.shape == (5, 10)


@pytest.mark.slow
def test_params_target_round_to_and_scratch_b(zoo_model, digits_npz, tmp_path):
    spec = JobSpec(
        method={"name": "l1_norm"},
        target={"params": 0.5, "tolerance": 0.02},
        recovery={"mode": "scratch", "epochs": 1, "epochs_mode": "B"},
        export={"round_to": 8},
    )
    report = run(
        spec,
        zoo_model("resnet_basic"),
        digits_npz,
        tmp_path / "o",
        latency_runs=20,
        catalog=registry,
    )
    assert report.target.kind == "params" and abs(report.target.achieved - 0.5) <= 0.02
    for row in report.layers:
        if row.channels_after != row.channels_before:
            assert row.channels_after % 8 == 0, row
    assert report.recovery["mode_used"] == "scratch"
    assert (
        report.recovery["epochs_used"]
        == math.ceil(report.macs.before / report.macs.after * 1 - 1e-9)
        or report.recovery["epochs_used"] >= 2
    )


def test_l1_scores_through_the_plugin_context(zoo_model, digits_npz):
    """The plugin interface: a method scores groups and the context meets the budget."""
    loaded = load.load(zoo_model("resnet_basic"), (1, 8, 8))
    from core.validation.datasets import load_npz
    from engine.flops import torch_costs
    from engine.train import TensorData

    data = TensorData.from_numpy(load_npz(digits_npz))
    x = data.x_train[:1]
    analysis = graph.analyse(loaded.module, x, data.x_train[:16])
    spec = JobSpec(method={"name": "l1_norm"}, target={"flops": 0.4})
    ctx = PruneContext(
        spec=spec,
        model=loaded.module,
        example=x,
        calibration=data.x_train[:64],
        data=data,
        analysis=analysis,
        base_costs=torch_costs(loaded.module, x),
        device=torch.device("cpu"),
        seed=0,
        progress=lambda f, m: None,
    )
    result = L1Norm(L1NormParams()).run(ctx)
    kept = torch_costs(result.model, x).macs / ctx.base_costs.macs
    assert abs(kept - 0.4) <= 0.01
    # residual groups stay coupled: every conv feeding the same sum has the same width
    widths = {
        n: m.out_channels for n, m in result.model.named_modules() if isinstance(m, nn.Conv2d)
    }
    assert widths["3/c2/c2/0/Conv"] == widths["2/c2/c2/0/Conv"] == widths["2/short/short/0/Conv"]
