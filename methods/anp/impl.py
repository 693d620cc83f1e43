"""anp: Adversarial Neural Pruning with latent vulnerability suppression (Madaan & Hwang 2019).

Every prunable channel group gets a beta-Bernoulli dropout mask (Lee et al.'s beta-Bernoulli
dropout): π ~ Kumaraswamy(a, b) (a reparameterisable stand-in for Beta(a, b)), z ~ relaxed
Bernoulli(π) at temperature 0.1 in training, z = E[π] at test. The masks multiply the
group's coupled out-channels (see `channel_maps`). Two objectives share one pass per batch:

* mask parameters (a, b): CE on PGD examples + β·KL(q(π) ‖ Beta(α, 1)) / N;
* weights: (CE_clean + 2·CE_adv) / 3 + β·KL / N + λ·V, where V is the mean over masked
  layers of mean |f_l(x) − f_l(x_adv)| (latent vulnerability suppression).

Then E[π] is folded into the layers it multiplied (exact: the masks scale layer outputs)
and channels are removed structurally in the order of E[π] until the budget is met
(`prune_to_budget(..., "global")`); the number of channels under the paper's 1e-3 threshold
is reported alongside. The report's `robustness` block gives clean, FGSM and PGD accuracy of
the original and the pruned model, with the attack's parameters.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from engine import train
from engine.channels import (
    GroupChannels,
    channel_dim,
    gate_output,
    group_channels,
)
from engine.method import MethodResult, PruneContext
from engine.train import TensorData, make_optimizer
from methods.anp import AnpParams
from methods.anp.attacks import Attack, pgd, robust_accuracy

EULER_GAMMA = 0.5772156649015329
_EPS = 1e-6


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class BetaBernoulli(nn.Module):
    """A beta-Bernoulli mask over `channels`: Kumaraswamy(a, b) posterior of the keep
    probability π (a, b = softplus of free parameters) and a relaxed Bernoulli draw."""

    def __init__(self, channels: int, a: float = 6.0, b: float = 1.0) -> None:
        super().__init__()
        self.a_raw = nn.Parameter(torch.full((channels,), _inverse_softplus(a)))
        self.b_raw = nn.Parameter(torch.full((channels,), _inverse_softplus(b)))

    @property
    def a(self) -> torch.Tensor:
        return F.softplus(self.a_raw) + _EPS

    @property
    def b(self) -> torch.Tensor:
        return F.softplus(self.b_raw) + _EPS

    def sample_pi(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """π = (1 − u^{1/b})^{1/a}, u ~ U(0, 1), computed in log space."""
        u = (
            torch.rand(self.a_raw.shape, generator=generator)
            .to(self.a_raw.device)
            .clamp(_EPS, 1 - _EPS)
        )
        log_pi = torch.log1p(-torch.exp(torch.log(u) / self.b).clamp(max=1 - _EPS)) / self.a
        return log_pi.exp()

    def relaxed_bernoulli(
        self, pi: torch.Tensor, temperature: float, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        pi = pi.clamp(_EPS, 1 - _EPS)
        u = torch.rand(pi.shape, generator=generator).to(pi.device).clamp(_EPS, 1 - _EPS)
        logits = (torch.log(pi) - torch.log1p(-pi) + torch.log(u) - torch.log1p(-u)) / temperature
        return torch.sigmoid(logits)

    def expected_pi(self) -> torch.Tensor:
        """E[π] = b · B(1 + 1/a, b) for π ~ Kumaraswamy(a, b)."""
        a, b = self.a, self.b
        return torch.exp(
            torch.log(b) + torch.lgamma(1 + 1 / a) + torch.lgamma(b) - torch.lgamma(1 + 1 / a + b)
        )

    def kl(self, alpha: float) -> torch.Tensor:
        """KL(Kumaraswamy(a, b) ‖ Beta(α, 1)) per channel (Nalisnick & Smyth 2017; the
        Taylor series term vanishes for a prior with β = 1, so this is exact). The Bernoulli
        part of the beta-Bernoulli KL is zero: q(z | π) = p(z | π)."""
        a, b = self.a, self.b
        return (
            (1 - alpha / a) * (-EULER_GAMMA - torch.digamma(b) - 1 / b)
            + torch.log(a * b)
            - math.log(alpha)  # log B(α, 1) = −log α
            - (b - 1) / b
        )


class ChannelMasks(nn.Module):
    """Beta-Bernoulli masks on every group, applied by forward hooks on the group's
    out-pruned Conv/Linear layers. `mode`: "sample" (one relaxed draw per `resample()`),
    "expected" (E[π]). The masked outputs of the last forward are kept in `features`."""

    def __init__(
        self, model: nn.Module, groups: list[GroupChannels], temperature: float = 0.1
    ) -> None:
        super().__init__()
        self.groups = groups
        self.temperature = temperature
        self.masks = nn.ModuleList([BetaBernoulli(g.channels) for g in groups])
        self.mode = "expected"
        self.record = False
        self.features: list[torch.Tensor] = []
        self._z: list[torch.Tensor] | None = None
        self._handles = []
        # One factor list per layer: (group index, channel map).
        self._per_layer: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
        for gi, g in enumerate(groups):
            for cmap in g.outs:
                p, base = cmap.projection(g.channels)
                self._per_layer.setdefault(cmap.module, []).append((gi, p, base))
        for name in self._per_layer:
            module = model.get_submodule(name)
            self._handles.append(gate_output(module, self._gate(name, channel_dim(module))))
            self._handles.append(module.register_forward_hook(self._record))

    @property
    def beta_masks(self) -> list[BetaBernoulli]:
        return [cast(BetaBernoulli, m) for m in self.masks]

    def resample(self, generator: torch.Generator | None = None) -> None:
        self._z = [
            m.relaxed_bernoulli(m.sample_pi(generator), self.temperature, generator)
            for m in self.beta_masks
        ]

    def root_factors(self) -> list[torch.Tensor]:
        if self.mode == "sample":
            if self._z is None:
                self.resample()
            return self._z  # type: ignore[return-value]
        return [m.expected_pi() for m in self.beta_masks]

    def layer_factor(self, name: str, width: int, factors: list[torch.Tensor]) -> torch.Tensor:
        out = None
        for gi, p, base in self._per_layer[name]:
            f = factors[gi] @ p.to(factors[gi].device) + base.to(factors[gi].device)
            out = f if out is None else out * f
        assert out is not None and out.numel() == width
        return out

    def _gate(self, name: str, dim: int):
        def gate(output: torch.Tensor) -> torch.Tensor:
            return self.layer_factor(name, output.shape[dim], self.root_factors())

        return gate

    def _record(self, module: nn.Module, inputs, output: torch.Tensor) -> None:
        """Runs after the gate hook: keeps the masked output."""
        if self.record:
            self.features.append(output)

    def kl(self, alpha: float) -> torch.Tensor:
        return torch.stack([m.kl(alpha).sum() for m in self.beta_masks]).sum()

    @torch.no_grad()
    def fold_and_remove(self, model: nn.Module) -> None:
        """Multiply E[π] into the weights and biases it scales, then detach the hooks: the
        model computes the same function without the masks."""
        factors = [m.expected_pi() for m in self.beta_masks]
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for name in self._per_layer:
            module = model.get_submodule(name)
            weight, bias = module.weight, module.bias
            assert isinstance(weight, torch.Tensor)
            width = weight.shape[0]
            factor = self.layer_factor(name, width, factors).to(weight.dtype)
            weight.mul_(factor.reshape([-1] + [1] * (weight.dim() - 1)))
            if bias is not None:
                assert isinstance(bias, torch.Tensor)
                bias.mul_(factor)


def vulnerability(clean: list[torch.Tensor], adv: list[torch.Tensor]) -> torch.Tensor:
    """Mean over layers of the mean absolute latent distortion |f_l(x) − f_l(x_adv)|."""
    return torch.stack([(c - a).abs().mean() for c, a in zip(clean, adv, strict=True)]).mean()


def adversarial_finetune_loss(attack: Attack, seed: int):
    """Recovery on (CE_clean + 2·CE_adv) / 3, ANP's weight objective without the masks;
    returned as the term added to the engine's clean cross-entropy."""
    gen = torch.Generator().manual_seed(seed)

    def loss(
        model: nn.Module, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor
    ) -> torch.Tensor:
        was_training = model.training
        model.eval()
        x_adv = pgd(model, x, y, attack, gen)
        model.train(was_training)
        return (2.0 / 3.0) * (F.cross_entropy(model(x_adv), y) - F.cross_entropy(logits, y))

    return loss


class ANP:
    def __init__(self, params: AnpParams) -> None:
        self.params = params

    def attack(self, data: TensorData) -> Attack:
        p = self.params
        return Attack.scaled(data.x_train, p.epsilon, p.pgd_step_size, p.pgd_steps)

    def learn_masks(
        self, ctx: PruneContext, model: nn.Module
    ) -> tuple[ChannelMasks, dict[str, Any]]:
        p = self.params
        dg = ctx.dependency_graph(model)
        masks = ChannelMasks(model, group_channels(model, dg, ctx.groups), p.temperature)
        model.add_module("anp_masks", masks)
        model.to(ctx.device)  # weights and masks train where the batches are
        attack = self.attack(ctx.data)
        rec = ctx.spec.recovery
        mask_params = list(masks.parameters())
        mask_ids = {id(q) for q in mask_params}
        weights = [q for q in model.parameters() if id(q) not in mask_ids and q.requires_grad]
        opt_w = make_optimizer(weights, rec.optimizer, rec.base_lr, rec.momentum, rec.weight_decay)
        opt_m = torch.optim.Adam(mask_params, lr=p.mask_lr)
        n_train = len(ctx.data.x_train)
        gen = torch.Generator().manual_seed(ctx.seed)
        noise = torch.Generator().manual_seed(ctx.seed + 1)
        mask_grads: list[tuple[torch.Tensor, ...]] = []

        def loss_of(batch: tuple[torch.Tensor, torch.Tensor], _step: int):
            xb, yb = batch
            model.eval()
            masks.mode = "expected"
            x_adv = pgd(model, xb, yb, attack, noise)
            model.train()
            masks.mode = "sample"
            masks.resample(noise)  # the same draw for the clean and the adversarial pass
            masks.record, masks.features = True, []
            ce_clean = F.cross_entropy(model(xb), yb)
            feats_clean, masks.features = masks.features, []
            ce_adv = F.cross_entropy(model(x_adv), yb)
            feats_adv, masks.features = masks.features, []
            masks.record = False
            kl = masks.kl(p.prior_alpha)
            v = vulnerability(feats_clean, feats_adv)
            loss_masks = ce_adv + p.beta * kl / n_train
            loss_weights = (ce_clean + 2 * ce_adv) / 3 + p.beta * kl / n_train + p.lambda_vs * v
            mask_grads[:] = [torch.autograd.grad(loss_masks, mask_params, retain_graph=True)]
            values = {"ce_clean": ce_clean, "ce_adv": ce_adv, "kl": kl, "vulnerability": v}
            return loss_weights, {k: float(val.detach()) for k, val in values.items()}

        def backward(loss_weights: torch.Tensor) -> None:
            """Each loss trains its own parameters: the weights' loss, the masks' loss."""
            loss_weights.backward(inputs=weights)
            for q, g in zip(mask_params, mask_grads[0], strict=True):
                q.grad = g

        def after_step() -> None:
            masks._z = None

        def on_step(epoch: int, step: int, total: int, _m: dict[str, float]) -> None:
            ctx.progress(
                0.6 * step / max(total, 1), f"ANP masks: epoch {epoch + 1}/{p.mask_epochs}"
            )

        hooks = train.Hooks(
            backward=backward,
            after_step=after_step,
            on_step=on_step,
            diverged=lambda _e, _l: "ANP mask training diverged; lower recovery.lr or mask_lr",
        )
        steps = math.ceil(n_train / rec.method_batch)
        batches = train.device_batches(ctx.data, rec.method_batch, gen, ctx.device)
        run = train.Loop(batches, steps, loss_of, [opt_w, opt_m], hooks=hooks)
        keys = ("ce_clean", "ce_adv", "kl", "vulnerability")
        history = [
            {k: round(sum(m.get(k, [])) / max(len(m.get(k, [])), 1), 5) for k in keys}
            for m in train.loop(model, run, p.mask_epochs)
        ]
        masks.mode = "expected"
        model.eval()
        return masks, {"mask_training": history, "attack_train": attack.describe()}

    def run(self, ctx: PruneContext) -> MethodResult:
        p = self.params
        model = ctx.copy_model()
        masks, details = self.learn_masks(ctx, model)
        with torch.no_grad():
            expected = [m.expected_pi().detach().cpu().double() for m in masks.beta_masks]
        scores = {g.name: e for g, e in zip(masks.groups, expected, strict=True)}
        masks.fold_and_remove(model)
        del model.anp_masks
        model.cpu().eval()
        pruned, plan, budget_details = ctx.prune_to_budget(scores, p.allocation, model=model)
        below = {name: int((s < p.threshold).sum()) for name, s in scores.items()}
        removed = {k: len(v) for k, v in plan.items()}
        details.update(budget_details)
        details.update(
            {
                "mask_threshold": p.threshold,
                "channels_below_threshold": sum(below.values()),
                "channels_removed": sum(removed.values()),
                "channels_total": sum(g.channels for g in ctx.groups),
                "removed_channels": removed,
                "expected_pi_mean": {name: round(float(s.mean()), 4) for name, s in scores.items()},
            }
        )
        notes = [
            f"ANP: {sum(below.values())} channels have E[π] below {p.threshold}; "
            f"{sum(removed.values())} were removed (lowest E[π] first) to meet the budget"
        ]
        attack = self.attack(ctx.data)
        eval_attack = Attack.scaled(ctx.data.x_train, p.epsilon, p.pgd_step_size, p.eval_pgd_steps)
        extra = adversarial_finetune_loss(attack, ctx.seed) if p.adversarial_finetune else None
        if extra is not None:
            notes.append("recovery fine-tuned adversarially on (CE_clean + 2·CE_PGD) / 3")

        def measure(original: nn.Module, recovered: nn.Module, data: TensorData) -> dict[str, Any]:
            before = robust_accuracy(original, data.x_test, data.y_test, eval_attack, seed=ctx.seed)
            after = robust_accuracy(recovered, data.x_test, data.y_test, eval_attack, seed=ctx.seed)
            return {
                "robustness": {
                    "original": before,
                    "pruned": after,
                    "samples": len(data.y_test),
                    "attacks": {
                        "pgd": {
                            **eval_attack.describe(),
                            "epsilon_fraction_of_range": p.epsilon,
                            "step_fraction_of_range": p.pgd_step_size,
                        },
                        "fgsm": {
                            "epsilon": eval_attack.epsilon,
                            "epsilon_fraction_of_range": p.epsilon,
                        },
                    },
                    "measured_with": "torch, white-box on each model itself, test split",
                    "adversarial_finetune": p.adversarial_finetune,
                }
            }

        return MethodResult(
            pruned, details=details, notes=notes, recovery_extra_loss=extra, post_recovery=measure
        )
