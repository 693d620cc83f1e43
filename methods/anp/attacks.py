"""L∞ attacks (FGSM, PGD) whose budgets are stated as fractions of the data's value range.

Papers quote ε for inputs in [0, 1] (CIFAR: ε = 0.03, step 0.007); a user's data may be
normalised to any range, so ε and the step are multiplied by (max − min) of the training
inputs, and adversarial inputs are clipped to [min, max].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Attack:
    epsilon: float  # absolute L∞ radius, in input units
    step_size: float  # absolute PGD step
    steps: int
    lo: float
    hi: float
    random_start: bool = True

    @classmethod
    def scaled(
        cls,
        x: torch.Tensor,
        epsilon: float,
        step_size: float,
        steps: int,
        random_start: bool = True,
    ) -> Attack:
        """epsilon and step_size given as fractions of the range of x."""
        lo, hi = float(x.min()), float(x.max())
        span = max(hi - lo, 1e-12)
        return cls(epsilon * span, step_size * span, steps, lo, hi, random_start)

    def describe(self) -> dict[str, float | int | bool]:
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(self).items()}


def _input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        loss = F.cross_entropy(model(x), y)
        (grad,) = torch.autograd.grad(loss, x)
    return grad


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Attack) -> torch.Tensor:
    grad = _input_grad(model, x, y)
    return (x + attack.epsilon * grad.sign()).clamp(attack.lo, attack.hi).detach()


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: Attack,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Madry et al.: random start in the ε-ball, `steps` signed-gradient ascent steps on the
    cross-entropy, each followed by projection onto the ε-ball and the data range."""
    x = x.detach()
    if attack.random_start:
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device) * 2 - 1
        adv = (x + attack.epsilon * noise).clamp(attack.lo, attack.hi)
    else:
        adv = x.clone()
    for _ in range(attack.steps):
        grad = _input_grad(model, adv, y)
        adv = adv + attack.step_size * grad.sign()
        adv = torch.min(torch.max(adv, x - attack.epsilon), x + attack.epsilon).clamp(
            attack.lo, attack.hi
        )
    return adv.detach()


def robust_accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: Attack,
    batch_size: int = 256,
    seed: int = 0,
) -> dict[str, float]:
    """Clean, FGSM (radius ε) and PGD accuracy of `model` on (x, y)."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    correct = {"clean": 0, "fgsm": 0, "pgd": 0}
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        with torch.no_grad():
            correct["clean"] += int((model(xb).argmax(-1) == yb).sum())
            x_f = fgsm(model, xb, yb, attack)
            correct["fgsm"] += int((model(x_f).argmax(-1) == yb).sum())
            x_p = pgd(model, xb, yb, attack, gen)
            correct["pgd"] += int((model(x_p).argmax(-1) == yb).sum())
    n = max(len(x), 1)
    return {k: v / n for k, v in correct.items()}
