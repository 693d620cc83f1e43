"""Training: fine-tuning, training from scratch, and the hooks methods need.

`loop` is the one training loop: batches -> loss -> zero_grad -> backward -> step, for
any number of optimizers, with hooks (`Hooks`): a custom backward (ANP's two losses),
after-backward (gradient edits), after-step (TAS's architecture step, resampling),
per-step and per-epoch callbacks, and the message when the loss diverges. It returns
each epoch's per-batch metrics, so each caller reduces them as it reports them.

`train` is recovery's cross-entropy training on top of it: `extra_loss` adds a
regulariser or a distillation term, `after_backward` edits gradients (Network Slimming's
L1 subgradient), `params` restricts what is trained (gates on frozen weights).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.errors import BadSpec

StepFn = Callable[[int, int, float], None]  # (step, total_steps, loss)
Batch = TypeVar("Batch")
Metrics = dict[str, float]
EpochMetrics = dict[str, list[float]]  # per-batch values of each metric over one epoch


@dataclass
class TensorData:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @classmethod
    def from_numpy(cls, ds) -> TensorData:
        def x(a: np.ndarray) -> torch.Tensor:
            if np.issubdtype(a.dtype, np.floating):
                return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
            return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))

        return cls(
            x(ds.x_train),
            torch.from_numpy(ds.y_train.astype(np.int64)),
            x(ds.x_test),
            torch.from_numpy(ds.y_test.astype(np.int64)),
        )

    def batches(
        self, batch_size: int, generator: torch.Generator, split: str = "train"
    ) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        x, y = (self.x_train, self.y_train) if split == "train" else (self.x_test, self.y_test)
        order = (
            torch.randperm(len(x), generator=generator)
            if split == "train"
            else torch.arange(len(x))
        )
        for i in range(0, len(x), batch_size):
            idx = order[i : i + batch_size]
            yield x[idx], y[idx]


def task_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for classification ([B, C] vs [B]) and language modelling
    ([B, T, V] vs [B, T], next-token)."""
    if logits.dim() == 3:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    return F.cross_entropy(logits, y)


def pick_device(requested: str | None = None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_optimizer(
    params: Iterable[nn.Parameter],
    name: str,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0
        )
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise BadSpec(f"unknown optimizer {name!r}; use sgd, adam or adamw")


def reinitialize(model: nn.Module, seed: int) -> None:
    """Fresh weights for every layer that knows how to reset itself (Scratch-E/B)."""
    torch.manual_seed(seed)
    for m in model.modules():
        if m is not model and hasattr(m, "reset_parameters"):
            reset = cast(Callable[[], None], m.reset_parameters)
            reset()


@dataclass
class Hooks:
    """What a training-time method adds to `loop`; every hook is optional."""

    backward: Callable[[torch.Tensor], None] | None = None  # replaces loss.backward()
    after_backward: Callable[[], None] | None = None  # edit gradients before the steps
    after_step: Callable[[], None] | None = None  # after the optimizers and schedulers
    on_step: Callable[[int, int, int, Metrics], None] | None = None  # (epoch, step, total, m)
    on_epoch: Callable[[int, EpochMetrics], None] | None = None
    diverged: Callable[[int, torch.Tensor], str] | None = None  # message; None: no check


@dataclass
class Loop(Generic[Batch]):
    """One training run: `batches(epoch)` yields the epoch's batches (`steps_per_epoch` of
    them), `loss(batch, step)` returns the loss and the batch's metrics."""

    batches: Callable[[int], Iterable[Batch]]
    steps_per_epoch: int
    loss: Callable[[Batch, int], tuple[torch.Tensor, Metrics]]
    optimizers: Sequence[torch.optim.Optimizer]
    schedulers: Sequence[Any] = ()
    hooks: Hooks = dataclasses.field(default_factory=Hooks)


def loop(model: nn.Module, run: Loop[Any], epochs: int) -> list[EpochMetrics]:
    """The one training loop (see the module doc); the model is left in eval mode."""
    hooks = run.hooks
    total = epochs * run.steps_per_epoch
    history: list[EpochMetrics] = []
    step = 0
    for epoch in range(epochs):
        model.train()
        metrics: EpochMetrics = {}
        for batch in run.batches(epoch):
            loss, values = run.loss(batch, step)
            if hooks.diverged is not None and not torch.isfinite(loss):
                raise FloatingPointError(hooks.diverged(epoch, loss))
            _step(run, hooks, loss)
            step += 1
            for k, v in values.items():
                metrics.setdefault(k, []).append(v)
            if hooks.on_step is not None:
                hooks.on_step(epoch, step, total, values)
        history.append(metrics)
        if hooks.on_epoch is not None:
            hooks.on_epoch(epoch, metrics)
    model.eval()
    return history


def _step(run: Loop[Any], hooks: Hooks, loss: torch.Tensor) -> None:
    for opt in run.optimizers:
        opt.zero_grad(set_to_none=True)
    if hooks.backward is not None:
        hooks.backward(loss)
    else:
        loss.backward()
    if hooks.after_backward is not None:
        hooks.after_backward()
    for opt in run.optimizers:
        opt.step()
    for sched in run.schedulers:
        sched.step()
    if hooks.after_step is not None:
        hooks.after_step()


def device_batches(
    data: TensorData, batch_size: int, generator: torch.Generator, device: torch.device
) -> Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]]:
    """`Loop.batches` for shuffled training batches of `data`, moved to `device`."""

    def batches(_epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        for xb, yb in data.batches(batch_size, generator):
            yield xb.to(device), yb.to(device)

    return batches


def train(
    model: nn.Module,
    data: TensorData,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 64,
    optimizer: str = "adam",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    schedule: str = "cosine",
    seed: int = 0,
    device: torch.device | None = None,
    params: Iterable[nn.Parameter] | None = None,
    extra_loss: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    | None = None,
    after_backward: Callable[[nn.Module], None] | None = None,
    after_step: Callable[[nn.Module], None] | None = None,
    on_step: StepFn | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Cross-entropy training; returns the mean loss of each epoch."""
    device = device or pick_device()
    model.to(device)
    if epochs <= 0:
        return []
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = make_optimizer(
        params if params is not None else model.parameters(), optimizer, lr, momentum, weight_decay
    )
    steps_per_epoch = math.ceil(len(data.x_train) / batch_size)
    sched = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
        if schedule == "cosine"
        else torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    )

    def loss_of(
        batch: tuple[torch.Tensor, torch.Tensor], _step: int
    ) -> tuple[torch.Tensor, Metrics]:
        xb, yb = batch
        logits = model(xb)
        loss = task_loss(logits, yb)
        if extra_loss is not None:
            loss = loss + extra_loss(model, xb, yb, logits)
        return loss, {"loss": loss.item()}

    def mean_loss(epoch_metrics: EpochMetrics) -> float:
        losses = epoch_metrics.get("loss", [])
        return float(np.mean(losses)) if losses else float("nan")

    hooks = Hooks(
        after_backward=(lambda: after_backward(model)) if after_backward is not None else None,
        after_step=(lambda: after_step(model)) if after_step is not None else None,
        on_step=(lambda _e, s, n, m: on_step(s, n, m["loss"])) if on_step is not None else None,
        on_epoch=(lambda e, m: on_epoch(e, mean_loss(m))) if on_epoch is not None else None,
        diverged=lambda epoch, loss: (
            f"training diverged (loss {loss.item()}) at epoch {epoch + 1}; lower recovery.lr"
        ),
    )
    run = Loop(
        device_batches(data, batch_size, gen, device),
        steps_per_epoch,
        loss_of,
        [opt],
        [sched],
        hooks,
    )
    return [mean_loss(m) for m in loop(model, run, epochs)]


def distillation_loss(
    teacher: nn.Module, alpha: float, temperature: float
) -> Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """Hinton et al.: alpha * T^2 * KL(teacher_T || student_T) - alpha * CE, so that the
    training loop's CE term ends up weighted (1 - alpha)."""
    teacher.eval()

    def loss(
        model: nn.Module, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor
    ) -> torch.Tensor:
        with torch.no_grad():
            t_logits = teacher(x)
        v = logits.shape[-1]
        kd = F.kl_div(
            F.log_softmax(logits.reshape(-1, v) / temperature, dim=-1),
            F.softmax(t_logits.reshape(-1, v) / temperature, dim=-1),
            reduction="batchmean",
        ) * (temperature**2)
        return alpha * kd - alpha * task_loss(logits, y)

    return loss


@torch.no_grad()
def accuracy(
    model: nn.Module, data: TensorData, batch_size: int = 256, device: torch.device | None = None
) -> float:
    device = device or pick_device()
    model.to(device).eval()
    correct = 0
    for xb, yb in data.batches(batch_size, torch.Generator(), split="test"):
        correct += int((model(xb.to(device)).argmax(-1).cpu() == yb).sum())
    return correct / max(len(data.y_test), 1)
