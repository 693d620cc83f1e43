"""pruning_from_scratch: the gate objective, the gate-epoch selection and the budget search."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import zoo
from engine import graph, train
from engine.flops import torch_costs
from engine.method import PruneContext, widths_to_plan
from methods.base.widths import WidthCost
from methods.pruning_from_scratch import PruningFromScratchParams
from methods.pruning_from_scratch.impl import (
    PruningFromScratch,
    gate_penalty,
    learn_gates,
    random_init,
    search_ratio,
)
from prunery.spec import JobSpec


def toy_context(n_train: int = 256, seed: int = 0) -> PruneContext:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    ).eval()
    a = zoo.digits_arrays()
    data = train.TensorData(
        torch.from_numpy(a["x_train"][:n_train]),
        torch.from_numpy(a["y_train"][:n_train]),
        torch.from_numpy(a["x_test"][:64]),
        torch.from_numpy(a["y_test"][:64]),
    )
    example = data.x_train[:1]
    analysis = graph.analyse(net, example, data.x_train[:8])
    spec = JobSpec(
        method={"name": "pruning_from_scratch"}, target={"flops": 0.5}, recovery={"batch_size": 16}
    )
    return PruneContext(
        spec=spec,
        model=net,
        example=example,
        calibration=data.x_train[:64],
        data=data,
        analysis=analysis,
        base_costs=torch_costs(net, example),
        device=torch.device("cpu"),
        seed=seed,
        progress=lambda f, m: None,
    )


def test_gate_penalty_is_zero_at_r_and_quadratic():
    g = [torch.full((10,), 0.2), torch.full((5,), 0.2)]
    assert float(gate_penalty(g, 0.2)) < 1e-12
    assert abs(float(gate_penalty([torch.ones(4)], 0.2)) - 0.64) < 1e-6


def test_gate_loss_pulls_mean_gate_towards_r_on_a_toy_net():
    ctx = toy_context()
    finals = {}
    for r in (0.2, 0.6):
        net = ctx.copy_model()
        random_init(net, 0)
        frozen = {k: v.clone() for k, v in net.state_dict().items()}
        gates, hist = learn_gates(ctx, net, lam=0.5, r=r, epochs=4, lr=0.05)
        means = hist["mean_gate"]
        # starts at 1, moves monotonically (within noise) to r
        assert means[0] < 1.0 and abs(means[-1] - r) < abs(means[0] - r)
        assert abs(means[-1] - r) < 0.05, means
        assert all(0.0 <= float(g.min()) and float(g.max()) <= 1.0 for g in gates.values())
        # only the gates were trained: the random weights are untouched
        assert all(torch.equal(frozen[k], v) for k, v in net.state_dict().items())
        # the kept epoch reached r and has the lowest CE among those that did
        best = hist["selected_epoch"] - 1
        reached = [i for i, m in enumerate(means) if m <= r + 0.01]
        assert hist["reached_sparsity"] and best in reached
        assert hist["ce"][best] == min(hist["ce"][i] for i in reached)
        finals[r] = means[-1]
    assert finals[0.2] < finals[0.6]


def test_gates_prefer_informative_channels():
    """The CE term is what separates channels: with lambda = 0 and r far below, the gates
    of a random net still change (CE alone moves them), so CE carries signal."""
    ctx = toy_context()
    net = ctx.copy_model()
    random_init(net, 0)
    gates, hist = learn_gates(ctx, net, lam=0.0, r=0.2, epochs=1, lr=0.05)
    values = torch.cat(list(gates.values()))
    assert float(values.std()) > 1e-3


@pytest.mark.slow  # every zoo model (trains the whole zoo on a cold cache)
def test_budget_search_hits_every_zoo_model(make_context):
    """Random gate values, every zoo model: the global-ratio search meets flops 0.5 (and
    params 0.5 on two models) within 1% on the structurally pruned network."""
    gen = torch.Generator().manual_seed(0)
    for name in zoo.ZOO:
        for kind in ("flops", "params") if name in ("resnet_basic", "mobilenet_v2") else ("flops",):
            ctx = make_context(name, "pruning_from_scratch", target={kind: 0.5})
            gates = {g.name: torch.rand(g.channels, generator=gen) for g in ctx.groups}
            channels = {g.name: g.channels for g in ctx.groups}
            cost = WidthCost(ctx.model, ctx.dependency_graph(), ctx.groups, ctx.base_costs, kind)
            ratio, widths, predicted, trace = search_ratio(cost, gates, channels, 0.5, ctx.round_to)
            assert 0.0 < ratio < 1.0 and len(trace) <= 18
            pruned = ctx.prune_plan(widths_to_plan(ctx.groups, gates, widths))
            c = ctx.costs(pruned)
            kept = (
                c.macs / ctx.base_costs.macs
                if kind == "flops"
                else c.params / ctx.base_costs.params
            )
            assert abs(kept - 0.5) <= 0.01, (name, kind, kept)
            assert abs(kept - predicted) < 1e-6, (name, kind, kept, predicted)
            # the kept channels are the globally largest gates: no removed gate beats a kept one
            # in the same group
            for g in ctx.groups:
                removed = widths_to_plan([g], gates, widths)[g.name]
                if removed and len(removed) < g.channels:
                    kept_idx = sorted(set(range(g.channels)) - set(removed))
                    assert float(gates[g.name][removed].max()) <= float(
                        gates[g.name][kept_idx].min()
                    )


def test_method_returns_a_scratch_architecture_with_curves(make_context):
    ctx = make_context("resnet_basic", "pruning_from_scratch")
    params = PruningFromScratchParams.model_validate({"gate_epochs": 2, "lambda": 0.5})
    result = PruningFromScratch(params).run(ctx)
    assert result.recovery == "scratch"
    d = result.details
    assert len(d["search_curves"]["loss"]) == 2 and len(d["search_curves"]["mean_gate"]) == 2
    assert {"group", "channels_before", "channels_after"} <= set(d["widths"][0])
    assert any(w["channels_after"] < w["channels_before"] for w in d["widths"])
    assert abs(d["kept_torch_count"] - 0.5) <= 0.01
    assert result.artifacts["search_curves.png"][:8] == b"\x89PNG\r\n\x1a\n"
    # the architecture is a pruning of the uploaded graph (the engine re-initialises it)
    assert ctx.costs(result.model).macs < ctx.base_costs.macs


def test_expand_widens_every_group_consistently(make_context):
    """expand=1.5 on a concat net, a depthwise net and a flatten->Linear net: the widened
    graph runs, Torch-Pruning sees the widened groups, MACs grow ~1.5^2, and the method
    still returns a pruning of the *original* graph that meets the budget."""
    from engine.graph import full_group
    from methods.pruning_from_scratch.expand import expanded_context

    for name in ("densenet", "mobilenet_v2", "vgg"):
        ctx = make_context(name, "pruning_from_scratch")
        wide, net, origin, skipped = expanded_context(ctx, ctx.copy_model(), 1.5)
        assert not skipped
        dg = wide.dependency_graph(net)
        for g, w in zip(ctx.groups, wide.groups, strict=True):
            assert w.channels == round(1.5 * g.channels)
            assert len(full_group(net, dg, w.name)[0].idxs) == w.channels
            assert torch.equal(origin[g.name][: g.channels], torch.arange(g.channels))
            assert int(origin[g.name].max()) == g.channels - 1
        assert 2.0 < wide.base_costs.macs / ctx.base_costs.macs < 2.3
    ctx = make_context("densenet", "pruning_from_scratch")
    params = PruningFromScratchParams.model_validate({"gate_epochs": 1, "expand": 1.5})
    result = PruningFromScratch(params).run(ctx)
    assert abs(result.details["kept_torch_count"] - 0.5) <= 0.01
    assert any("widened x1.5" in n for n in result.notes)
    assert all(w["channels_after"] <= w["channels_before"] for w in result.details["widths"])
