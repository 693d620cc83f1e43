"""Recovery helpers shared by the pipeline, progressive pruning and `auto`: which
distillation applies, training for a (possibly fractional) number of epochs, the validation
split carved from the training data, and the learning rate chosen on it."""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from engine import train
from prunery.spec import JobSpec

ExtraLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def distillation(
    spec: JobSpec, method_distill: dict[str, float] | None = None
) -> dict[str, Any] | None:
    """The distillation recovery uses: the method's own (TAS asks for it with its own
    alpha/T), else the spec's `recovery.distill` when enabled, else None."""
    if method_distill:
        return {
            "alpha": float(method_distill.get("alpha", 0.9)),
            "temperature": float(method_distill.get("temperature", 4.0)),
            "source": "method",
        }
    kd = spec.recovery.distill
    if not kd.enabled or kd.alpha == 0.0:
        return None
    return {"alpha": kd.alpha, "temperature": kd.temperature, "source": "recovery.distill"}


def distill_loss(
    teacher: nn.Module, kd: dict[str, Any] | None, device: torch.device
) -> ExtraLoss | None:
    """The training loop's extra loss for `kd` (a frozen copy of `teacher` on `device`)."""
    if kd is None:
        return None
    frozen = copy.deepcopy(teacher).to(device).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    return train.distillation_loss(frozen, kd["alpha"], kd["temperature"])


def combine(first: ExtraLoss | None, second: ExtraLoss | None) -> ExtraLoss | None:
    if first is None or second is None:
        return first or second
    return lambda m, x, y, lo: first(m, x, y, lo) + second(m, x, y, lo)


def train_epochs(
    ctx, model: nn.Module, epochs: float, seed_offset: int = 0, **kwargs: Any
) -> list[float]:
    """`ctx.train` for `epochs` epochs, where a fraction means one pass over that share of
    the training data (one learning-rate schedule over the whole run). Returns the loss
    curve (one value per call of the loop)."""
    if epochs <= 0:
        return []
    if float(epochs).is_integer():
        return ctx.train(model, int(epochs), **kwargs)
    x, y = ctx.data.x_train, ctx.data.y_train
    n = len(x)
    gen = torch.Generator().manual_seed(ctx.seed + 7919 + seed_offset)
    whole = int(math.floor(epochs))
    parts = [torch.randperm(n, generator=gen) for _ in range(whole)]
    parts.append(torch.randperm(n, generator=gen)[: max(1, round((epochs - whole) * n))])
    idx = torch.cat(parts)
    data = dataclasses.replace(ctx.data, x_train=x[idx], y_train=y[idx])
    return dataclasses.replace(ctx, data=data).train(model, 1, **kwargs)


def validation_split(data: train.TensorData, fraction: float, seed: int) -> train.TensorData:
    """(train minus validation, validation) as one TensorData whose *test* fields hold the
    validation part, so everything downstream that evaluates reads validation data. The
    job's test split is not touched."""
    n = len(data.x_train)
    if n < 4:
        raise ValueError(f"a validation split needs at least 4 training samples; there are {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 104729))
    n_val = min(n - 2, max(2, round(fraction * n)))
    val, rest = order[:n_val], order[n_val:]
    return train.TensorData(
        data.x_train[rest], data.y_train[rest], data.x_train[val], data.y_train[val]
    )


@torch.no_grad()
def validation_accuracy(
    model: nn.Module, data: train.TensorData, device: torch.device, batch_size: int = 256
) -> float:
    """Top-1 accuracy on the validation part (for language models: next-token accuracy)."""
    model.to(device).eval()
    correct, total = 0, 0
    for xb, yb in data.batches(batch_size, torch.Generator(), split="test"):
        logits = model(xb.to(device))
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        pred = logits.argmax(-1).cpu()
        correct += int((pred == yb).sum())
        total += yb.numel()
    return correct / max(total, 1)


# Share of the training split held out when the recovery's learning rate is chosen.
LR_VALIDATION_FRACTION = 0.15


def choose_lr(
    ctx: Any,
    model: nn.Module,
    choices: Sequence[float],
    epochs: float,
    extra_loss: ExtraLoss | None = None,
    progress: Callable[[float, str], None] | None = None,
) -> tuple[float, dict[str, Any]]:
    """Each learning rate of `choices` fine-tunes `model`, from the same starting weights,
    for `epochs` on the training split minus a validation part (`LR_VALIDATION_FRACTION`,
    drawn with the job's seed) and is scored by validation accuracy; the best wins, ties to
    the earlier. A choice whose training diverges is a row of the table, not a failed job.
    `model` ends with the weights (and mode) it came with. Returns (learning rate, details
    for the report)."""
    split = validation_split(ctx.data, LR_VALIDATION_FRACTION, ctx.seed)
    sctx = dataclasses.replace(ctx, data=split)
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    best: tuple[float, float] | None = None
    # Each choice trains `model` itself from the same starting weights, restored after: a
    # state_dict copy, not a deepcopy (dynamic models such as SANP's hold non-leaf tensors,
    # which deepcopy refuses), and one network's memory instead of two.
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    for i, lr in enumerate(choices):
        model.load_state_dict(start)
        t0 = time.perf_counter()
        row: dict[str, Any] = {"lr": lr}

        def step(s: int, total: int, loss: float, i: int = i, lr: float = lr) -> None:
            if progress:
                progress((i + s / total) / len(choices), f"learning rate {lr:g}: loss {loss:.4f}")

        try:
            train_epochs(sctx, model, epochs, lr=lr, extra_loss=extra_loss, on_step=step)
            acc = validation_accuracy(model, split, ctx.device)
            row["val_accuracy"] = round(acc, 5)
            if best is None or acc > best[0]:
                best = (acc, lr)
        except FloatingPointError as exc:  # diverged: this learning rate is too high
            row["error"] = str(exc).splitlines()[0][:200]
        row["seconds"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
    model.load_state_dict(start)
    model.train(was_training)
    for n, p in model.named_parameters():
        p.requires_grad_(trainable[n])
    if best is None:
        raise FloatingPointError(
            f"recovery diverged at every learning rate of recovery.lr_choices {list(choices)}; "
            "give lower ones, or set recovery.lr"
        )
    acc, lr = best
    return (
        lr,
        {
            "chosen": lr,
            "table": rows,
            "validation_samples": len(split.x_test),
            "validation_accuracy": round(acc, 5),
            "screen_epochs": epochs,
            "metric": "next-token accuracy"
            if ctx.spec.task == "language_modeling"
            else "top-1 accuracy",
            "seconds": round(time.perf_counter() - t_start, 2),
        },
    )
