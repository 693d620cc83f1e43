"""tas: sampling and alignment, the exact expected FLOPs, the FLOPs loss gradient, the
mapping of searched widths to channels, the budget adjustment and distillation."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

import zoo
from engine import train
from engine.graph import channel_scores
from engine.method import widths_to_plan
from methods.base.scoring import filter_l1
from methods.base.widths import ChannelSites, WidthCost
from methods.tas import TASParams
from methods.tas.impl import (
    TAS,
    WidthSearch,
    adjust_to_budget,
    candidate_widths,
    cwi_matrix,
    flop_loss,
    sample_two,
)

FRACTIONS = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


def _search_for(ctx, model=None):
    model = model if model is not None else ctx.model
    dg = ctx.dependency_graph(model)
    l1 = {g.name: channel_scores(model, dg, g.name, filter_l1) for g in ctx.groups}
    order = {n: torch.argsort(-s, stable=True) for n, s in l1.items()}
    cands = {g.name: candidate_widths(g.channels, FRACTIONS, ctx.round_to) for g in ctx.groups}
    return WidthSearch(ctx.groups, cands, order), dg, order


def _one_hot(search: WidthSearch, choice: dict[str, int]) -> None:
    with torch.no_grad():
        for n in search.names:
            a = search.alpha(n)
            a.fill_(-1e4)
            a[choice[n]] = 0.0


def test_cwi_is_identity_at_equal_width_and_averages_otherwise():
    assert torch.equal(cwi_matrix(5, 5), torch.eye(5))
    m = cwi_matrix(3, 8)
    assert m.shape == (8, 3) and torch.allclose(m.sum(1), torch.ones(8))
    # order-preserving: output channel i reads input channels near i * k / width
    assert int(m[0].argmax()) == 0 and int(m[-1].argmax()) == 2


def test_gumbel_sampling_gives_two_candidates_with_renormalised_weights():
    alpha = torch.zeros(6, requires_grad=True)
    gen = torch.Generator().manual_seed(0)
    idx, w = sample_two(alpha, 1.0, gen)
    assert idx.numel() == 2 and idx[0] != idx[1]
    assert abs(float(w.sum()) - 1.0) < 1e-6
    w[0].backward()
    assert alpha.grad is not None and float(alpha.grad.abs().sum()) > 0
    # low temperature, peaked distribution: the mode is almost always one of the two
    peaked = torch.tensor([0.0, 0.0, 6.0, 0.0])
    hits = sum(2 in sample_two(peaked, 0.1, gen)[0].tolist() for _ in range(50))
    assert hits >= 48


def test_expected_flops_equal_exact_flops_for_one_hot_distributions(make_context):
    gen = torch.Generator().manual_seed(0)
    for name in ("vgg", "resnet_basic", "mobilenet_v2", "densenet", "se_resnet", "mixer"):
        ctx = make_context(name, "tas")
        search, dg, order = _search_for(ctx)
        cost = WidthCost(ctx.model, dg, ctx.groups, ctx.base_costs, "flops")
        for _ in range(2):
            choice = {
                n: int(torch.randint(len(search.candidates[n]), (1,), generator=gen))
                for n in search.names
            }
            _one_hot(search, choice)
            widths = {n: search.candidates[n][choice[n]] for n in search.names}
            expected = float(cost(search.expected_widths()))
            scores = {n: -torch.argsort(order[n]).double() for n in order}
            exact = ctx.costs(ctx.prune_plan(widths_to_plan(ctx.groups, scores, widths))).macs
            assert abs(expected - exact) <= 1e-6 * exact + 1, (name, expected, exact)


def test_flop_loss_pushes_distributions_to_fewer_channels_when_over_budget(make_context):
    ctx = make_context("resnet_basic", "tas")
    search, dg, _ = _search_for(ctx)
    cost = WidthCost(ctx.model, dg, ctx.groups, ctx.base_costs, "flops")
    with torch.no_grad():
        for a in search.alphas:
            a.zero_()
            a[-1] = 1.0  # argmax: full width, far over a 0.3 budget
    argmax = float(cost.fraction(search.argmax_widths()))
    assert argmax > 0.3
    before = {n: float(v) for n, v in search.expected_widths().items()}
    loss = flop_loss(cost.fraction(search.expected_widths()), argmax, 0.3, 0.05)
    loss.backward()
    with torch.no_grad():
        for a in search.alphas:
            a -= 0.5 * a.grad
            a.grad = None
    after = {n: float(v) for n, v in search.expected_widths().items()}
    assert all(after[n] < before[n] for n in before), (before, after)
    # under budget by more than the tolerance: the sign flips (towards more channels)
    loss = flop_loss(cost.fraction(search.expected_widths()), 0.1, 0.3, 0.05)
    loss.backward()
    assert all(float((a.grad * torch.arange(a.numel())).sum()) < 0 for a in search.alphas)
    # inside the band: no FLOPs pressure
    assert float(flop_loss(cost.fraction(search.expected_widths()), 0.29, 0.3, 0.05)) == 0.0


def test_argmax_supernet_equals_the_pruned_network(make_context):
    """Hard widths through the channel-map hooks compute exactly what the structurally
    pruned network computes: the searched width k is the first k channels of the sharing
    order, and that is what gets kept."""
    for name in ("resnet_bottleneck", "densenet"):
        ctx = make_context(name, "tas")
        net = ctx.copy_model()
        search, dg, order = _search_for(ctx, net)
        gen = torch.Generator().manual_seed(1)
        _one_hot(
            search,
            {
                n: int(torch.randint(len(search.candidates[n]), (1,), generator=gen))
                for n in search.names
            },
        )
        sites = ChannelSites(net, dg, ctx.groups)
        sites.attach(search.channel_map)
        search.mode = "argmax"
        search.resample(1.0)
        x = ctx.data.x_test[:32]
        with torch.no_grad():
            masked = net(x)
        sites.detach()
        scores = {n: -torch.argsort(order[n]).double() for n in order}
        pruned = ctx.prune_plan(widths_to_plan(ctx.groups, scores, search.argmax_widths()), net)
        with torch.no_grad():
            assert torch.allclose(pruned(x), masked, atol=1e-4, rtol=1e-4), name


def test_budget_adjustment_is_small_and_lands_in_the_band(make_context):
    ctx = make_context("mobilenet_v2", "tas")
    search, dg, _ = _search_for(ctx)
    cost = WidthCost(ctx.model, dg, ctx.groups, ctx.base_costs, "flops")
    widths = {n: search.candidates[n][len(search.candidates[n]) // 2] for n in search.names}
    channels = {g.name: g.channels for g in ctx.groups}
    start = float(cost.fraction(widths))
    for target in (start - 0.04, start + 0.04):
        adjusted, changed = adjust_to_budget(cost, widths, channels, target, 0.01, 1)
        assert abs(float(cost.fraction(adjusted)) - target) <= 0.005
        assert changed == sum(abs(adjusted[n] - widths[n]) for n in widths) > 0
        direction = 1 if target > start else -1
        assert all((adjusted[n] - widths[n]) * direction >= 0 for n in widths)
    same, changed = adjust_to_budget(cost, widths, channels, start, 0.01, 1)
    assert same == widths and changed == 0


def test_distillation_lowers_kl_to_the_teacher(make_context):
    ctx = make_context("vgg", "tas")
    teacher = ctx.model
    a = zoo.digits_arrays()
    data = train.TensorData(
        *(torch.from_numpy(a[k][:512]) for k in ("x_train", "y_train")),
        *(torch.from_numpy(a[k]) for k in ("x_test", "y_test")),
    )
    pruned = ctx.prune_plan(
        {ctx.groups[2].name: list(range(40)), ctx.groups[3].name: list(range(20))}
    )
    train.reinitialize(pruned, 0)
    x = data.x_test

    def kl(model) -> float:
        with torch.no_grad():
            return float(
                F.kl_div(
                    F.log_softmax(model(x) / 4.0, -1),
                    F.softmax(teacher(x) / 4.0, -1),
                    reduction="batchmean",
                )
            )

    start = kl(pruned)
    results = {}
    for label, extra in (("ce", None), ("kd", train.distillation_loss(teacher, 0.9, 4.0))):
        student = copy.deepcopy(pruned)
        train.train(student, data, epochs=2, lr=3e-3, extra_loss=extra, device=torch.device("cpu"))
        results[label] = kl(student)
    assert results["kd"] < start and results["kd"] < results["ce"], (start, results)


def test_tas_run_reports_searched_widths_curves_and_meets_budget(make_context):
    ctx = make_context("resnet_basic", "tas")
    result = TAS(TASParams(search_epochs=2)).run(ctx)
    d = result.details
    assert result.distill == {"alpha": 0.9, "temperature": 4.0}
    for key in ("weight_ce", "arch_ce", "expected_fraction", "argmax_fraction", "tau"):
        assert len(d["search_curves"][key]) == 2
    assert d["search_curves"]["tau"][0] == 5.0 and abs(d["search_curves"]["tau"][-1] - 0.1) < 1e-9
    assert all({"searched", "channels_after", "channels_before"} <= set(w) for w in d["widths"])
    kept = ctx.costs(result.model).macs / ctx.base_costs.macs
    assert (
        abs(kept - 0.5) <= 0.01 and abs(d["budget_adjustment"]["adjusted_fraction"] - kept) < 1e-6
    )
    assert result.artifacts["search_curves.png"][:4] == b"\x89PNG"
    # searched distributions are proper distributions over the candidates
    for n, probs in d["distributions"].items():
        assert len(probs) == len(d["candidates"][n]) and abs(sum(probs) - 1) < 1e-3
