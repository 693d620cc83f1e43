"""The mechanisms under ANP and SANP, each checked against an independent computation."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zoo
from engine import graph, load, train
from engine.channels import group_channels
from engine.flops import torch_costs
from methods.anp import impl as anp
from methods.anp.attacks import Attack, fgsm, pgd
from methods.sanp import impl as sanp

ALPHA = 1e-4
SHAPES = [(0.5, 0.5), (1.0, 1.0), (6.0, 1.0), (2.0, 5.0), (0.3, 3.0)]


def _mask(a: float, b: float, n: int) -> anp.BetaBernoulli:
    m = anp.BetaBernoulli(n, a=a, b=b)
    m.double()
    return m


def _kumaraswamy_mean_by_quadrature(a: float, b: float) -> float:
    """∫ π · a b π^{a−1} (1 − π^a)^{b−1} dπ, on a fine grid (independent of the Beta-function form)."""
    t = np.linspace(0.0, 1.0, 2_000_001)[1:-1]
    # Substitute π = t^{1/a} to tame the endpoint singularities: E[π] = ∫ b t^{1/a} (1−t)^{b−1} dt.
    f = b * t ** (1.0 / a) * (1.0 - t) ** (b - 1.0)
    return float(np.trapezoid(f, t)) if hasattr(np, "trapezoid") else float(np.trapz(f, t))


@pytest.mark.parametrize(("a", "b"), SHAPES)
def test_beta_bernoulli_sampler_mean_matches_expectation(a, b):
    n = 400_000
    m = _mask(a, b, n)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        expected = float(m.expected_pi()[0])
        pi = m.sample_pi(gen)
        z = m.relaxed_bernoulli(pi, temperature=0.1, generator=gen)
    # Closed form vs quadrature of the density.
    assert abs(expected - _kumaraswamy_mean_by_quadrature(a, b)) < 2e-3
    # Kumaraswamy draws: mean within ~5 standard errors.
    se = float(pi.std()) / math.sqrt(n)
    assert abs(float(pi.mean()) - expected) < 5 * se + 1e-4
    # The relaxed Bernoulli at temperature 0.1 is nearly binary and keeps the mean E[π].
    assert abs(float(z.mean()) - expected) < 0.01
    assert float(((z > 0.05) & (z < 0.95)).float().mean()) < 0.2


def test_kl_is_non_negative_and_matches_monte_carlo():
    grid = torch.tensor([0.05, 0.2, 0.5, 1.0, 2.0, 6.0, 20.0], dtype=torch.float64)
    a, b = torch.meshgrid(grid, grid, indexing="ij")
    m = anp.BetaBernoulli(a.numel())
    m.double()
    with torch.no_grad():
        m.a_raw.copy_(torch.log(torch.expm1(a.flatten())))
        m.b_raw.copy_(torch.log(torch.expm1(b.flatten())))
        kl = m.kl(ALPHA)
    assert torch.isfinite(kl).all()
    assert (kl >= 0).all(), kl.min()
    # Monte Carlo E_q[log q(π) − log p(π)] for a few posteriors.
    gen = torch.Generator().manual_seed(1)
    for a_, b_ in SHAPES[1:4]:
        q = _mask(a_, b_, 400_000)
        with torch.no_grad():
            u = torch.rand(400_000, generator=gen, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
            log_pi = torch.log1p(-(u ** (1 / b_))) / a_
            log_1m_pia = torch.log(u) / b_  # 1 − π^a = u^{1/b}
            log_q = math.log(a_ * b_) + (a_ - 1) * log_pi + (b_ - 1) * log_1m_pia
            log_p = (ALPHA - 1) * log_pi + math.log(ALPHA)  # Beta(α, 1): π^{α−1} / B(α, 1), B = 1/α
            mc = float((log_q - log_p).mean())
            exact = float(q.kl(ALPHA)[0])
        assert abs(mc - exact) < 0.02 * abs(exact) + 0.02, (a_, b_, mc, exact)


def _tiny_classifier(data: train.TensorData) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    train.train(model, data, epochs=10, lr=3e-3, device=torch.device("cpu"))
    model.zero_grad(set_to_none=True)
    return model.eval()


@pytest.fixture(scope="module")
def digits() -> train.TensorData:
    arrays = zoo.digits_arrays()
    return train.TensorData(
        *(torch.from_numpy(arrays[k]) for k in ("x_train", "y_train", "x_test", "y_test"))
    )


def test_pgd_increases_the_loss_and_stays_in_the_ball(digits):
    model = _tiny_classifier(digits)
    x, y = digits.x_test[:128], digits.y_test[:128]
    attack = Attack.scaled(digits.x_train, epsilon=0.05, step_size=0.0125, steps=10)
    span = float(digits.x_train.max() - digits.x_train.min())
    assert attack.epsilon == pytest.approx(0.05 * span) and attack.lo == float(digits.x_train.min())
    x_adv = pgd(model, x, y, attack, torch.Generator().manual_seed(0))
    x_fgsm = fgsm(model, x, y, attack)
    for adv in (x_adv, x_fgsm):
        assert float((adv - x).abs().max()) <= attack.epsilon + 1e-6
        assert float(adv.min()) >= attack.lo - 1e-6 and float(adv.max()) <= attack.hi + 1e-6
    with torch.no_grad():
        clean = F.cross_entropy(model(x), y)
        adv_loss = F.cross_entropy(model(x_adv), y)
        noise = (x + attack.epsilon * torch.sign(torch.randn_like(x))).clamp(attack.lo, attack.hi)
        random_loss = F.cross_entropy(model(noise), y)
        fgsm_loss = F.cross_entropy(model(x_fgsm), y)
    assert adv_loss > 1.5 * clean and adv_loss > random_loss
    assert adv_loss >= fgsm_loss * 0.99  # ten projected steps do at least as well as one
    # No gradient leaks into the model's parameters.
    assert all(p.grad is None for p in model.parameters())


@pytest.fixture(scope="module")
def resnet(zoo_model):
    x = torch.from_numpy(zoo.digits_arrays()["x_train"][:64])
    module = load.load(Path(zoo_model("resnet_basic")), (1, 8, 8), seed=0).module
    analysis = graph.analyse(module, x[:1], x[:16])
    return module, analysis.groups, x


def test_anp_masks_fold_exactly_into_the_weights(resnet):
    module, groups, x = resnet
    model = copy.deepcopy(module)
    masks = anp.ChannelMasks(
        model, group_channels(model, graph.build_dependency_graph(model, x[:1]), groups)
    )
    with torch.no_grad():  # spread the keep probabilities
        for m in masks.masks:
            m.a_raw.uniform_(-2, 3)
            m.b_raw.uniform_(-1, 2)
        masked = model(x)
        masks.fold_and_remove(model)
        folded = model(x)
        plain = module(x)
    assert torch.allclose(masked, folded, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(masked, plain, atol=1e-3)  # the masks did something


def test_sanp_gating_is_removal_and_the_cost_model_counts_it(resnet):
    """With a fixed gate pattern, the gated model equals the structurally pruned one and the
    per-sample MACs equal the pruned model's MACs (plus the modules' own)."""
    module, groups, x = resnet
    base = torch_costs(module, x[:1]).macs
    model = copy.deepcopy(module)
    controller = sanp.attach(
        model, graph.build_dependency_graph(model, x[:1]), groups, x[:1], base, 0.25
    )
    gen = torch.Generator().manual_seed(3)
    plan = {}
    with torch.no_grad():
        for g, spm in zip(controller.groups, controller.spms, strict=True):
            keep = torch.rand(g.channels, generator=gen) < 0.6
            keep[0] = True
            spm.fc2.weight.zero_()
            spm.fc2.bias.copy_(torch.where(keep, 1.0, -1.0))
            plan[g.name] = torch.nonzero(~keep).flatten().tolist()
        gated = model.eval()(x)
        per_sample = controller.macs_per_sample()
    pruned = graph.prune_copy(module, x[:1], plan)
    with torch.no_grad():
        removed = pruned(x)
    assert torch.allclose(gated, removed, atol=1e-4, rtol=1e-4)
    expected = torch_costs(pruned, x[:1]).macs + controller.spm_macs
    assert torch.allclose(per_sample, torch.full_like(per_sample, float(expected)), rtol=1e-6)
    assert expected < base


class _ToyConvNet(nn.Module):
    # Not an nn.Sequential: attach() registers the controller as a child module, which a
    # Sequential would call in its forward (engine models are fx GraphModules).
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 12, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(12, 24, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(24, 24, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(24, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _toy_convnet() -> nn.Module:
    torch.manual_seed(0)
    return _ToyConvNet()


@pytest.mark.parametrize("target", [0.4, 0.7])
def test_sanp_cost_loss_drives_the_mean_macs_to_the_budget(digits, target):
    """No calibration here: the cost loss alone moves the measured mean to the target."""
    model = _toy_convnet()
    train.train(model, digits, epochs=2, lr=3e-3, device=torch.device("cpu"))
    x = digits.x_train[:1]
    base = torch_costs(model, x).macs
    analysis = graph.analyse(model, x, digits.x_train[:16])
    controller = sanp.attach(
        model, graph.build_dependency_graph(model, x), analysis.groups, x, base, 0.25
    )
    start = float(sanp.measure_macs(model, controller, digits.x_test).mean()) / base
    assert start > 0.95  # the modules start by keeping everything
    sanp.train_jointly(
        model, controller, digits, target, epochs=4, cost_weight=100.0, lr=1e-3, spm_lr=0.01
    )
    macs = sanp.measure_macs(model, controller, digits.x_test) / base
    assert abs(float(macs.mean()) - target) < 0.05, float(macs.mean())
    assert float(macs.std()) > 0  # decisions differ between samples
