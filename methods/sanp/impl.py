"""sanp: Self-Adaptive Network Pruning (Chen, Zhu, Li, Zhao; ICONIP 2019).

The paper has no public code and its body was not available to us; what follows is built
from its abstract ("a Saliency-and-Pruning Module (SPM) for each convolutional layer, which
learns to predict saliency scores and applies pruning for each channel ... such that the
average computation cost meets the budget"; keywords: saliency prediction, multi-task
learning) and METHODS.md. The module's exact form is therefore our design:

* SPM (one per prunable conv group): GAP of the input of the group's first conv to run →
  FC → ReLU → FC → one saliency logit per root channel. The decision is `logit > 0`
  (keep) per sample, plus always the group's top 10% logits (TopK), so that no sample loses
  a whole layer (the static allocator's max_layer_ratio 0.9, per sample). In training the
  forward pass uses that hard decision and the backward pass the gradient of a wide sigmoid
  (straight-through); optional logistic noise explores.
* The decision multiplies every out-pruned conv of the group (zero is exactly a removal,
  see `channel_maps`), so the exported ONNX carries the modules and the gating as
  ReduceMean/Gemm/TopK/Greater/Or/Cast/Mul — no data-dependent control flow.
* Cost: per sample, a conv costs its MACs × the mean over its output channels of
  (output kept × fraction of that channel's inputs kept); SPMs' own MACs are counted.
  Training minimises CE + w·(mean MACs fraction of the batch − target)², backbone and
  modules jointly (the paper's multi-task objective).
* Calibration: a global shift of the logits is set by bisection on the training inputs so
  that the mean MACs fraction equals the target, then folded into the last FC's bias; the
  modules are frozen during the engine's recovery and the shift is re-set after it.

The report's `dynamic` block is measured per sample on the evaluation set from the gates
the model actually takes.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from engine import train
from engine.flops import torch_costs
from engine.method import MethodResult, PruneContext
from engine.train import TensorData, make_optimizer
from methods.sanp import SanpParams
from methods.sanp.gates import GateController, attach, calibrate, measure_macs


def train_jointly(
    model: nn.Module,
    controller: GateController,
    data: TensorData,
    target: float,
    *,
    epochs: int,
    cost_weight: float,
    lr: float,
    spm_lr: float,
    batch_size: int = 64,
    optimizer: str = "adam",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: torch.device | None = None,
    train_backbone: bool = True,
    noise: bool = False,
    min_keep: float = 0.1,
    progress=None,
) -> list[dict[str, float]]:
    """CE + cost_weight·(batch mean MACs fraction − target)², backbone and SPMs together."""
    device = device or torch.device("cpu")
    model.to(device)
    spm_params = list(controller.spms.parameters())
    spm_ids = {id(p) for p in spm_params}
    backbone = [p for p in model.parameters() if id(p) not in spm_ids and p.requires_grad]
    opts: list[torch.optim.Optimizer] = [torch.optim.Adam(spm_params, lr=spm_lr)]
    if train_backbone and backbone:
        opts.append(make_optimizer(backbone, optimizer, lr, momentum, weight_decay))
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    base = float(controller.base_macs)

    def loss_of(batch: tuple[torch.Tensor, torch.Tensor], _step: int):
        xb, yb = batch
        ce = F.cross_entropy(model(xb), yb)
        frac = controller.macs_per_sample().mean() / base
        # A floor on each group's mean keep rate: a layer gated off for every sample
        # has a vanishing straight-through gradient and would never come back.
        floor = sum(F.relu(min_keep - cast(torch.Tensor, p).mean()) ** 2 for p in controller.soft)
        loss = ce + cost_weight * ((frac - target) ** 2 + floor)
        return loss, {"ce": float(ce.detach()), "macs_fraction": float(frac.detach())}

    def on_step(epoch: int, step: int, total: int, _m: train.Metrics) -> None:
        if progress is not None:
            progress(step / max(total, 1), f"SANP joint training: epoch {epoch + 1}/{epochs}")

    hooks = train.Hooks(
        on_step=on_step,
        diverged=lambda _e, _l: "SANP joint training diverged; lower recovery.lr or spm_lr",
    )
    steps = math.ceil(len(data.x_train) / batch_size)
    run = train.Loop(
        train.device_batches(data, batch_size, gen, device), steps, loss_of, opts, hooks=hooks
    )
    controller.explore = noise
    try:
        epochs_metrics = train.loop(model, run, epochs)
    finally:
        controller.explore = False
        model.eval()
    return [
        {
            k: round(sum(m.get(k, [])) / max(len(m.get(k, [])), 1), 5)
            for k in ("ce", "macs_fraction")
        }
        for m in epochs_metrics
    ]


def dynamic_report(
    model: nn.Module, controller: GateController, x: torch.Tensor, example: torch.Tensor
) -> dict[str, Any]:
    macs = measure_macs(model, controller, x).double()
    keep = []
    for i in range(0, len(x), 256):
        with torch.no_grad():
            model(x[i : i + 256])
        keep.append(torch.cat([g.mean(1, keepdim=True) for g in controller.current], dim=1))  # type: ignore[union-attr]
    keep_rates = torch.cat(keep).mean(0)
    return {
        "macs_mean": float(macs.mean()),
        "macs_std": float(macs.std(unbiased=False)),
        "macs_min": float(macs.min()),
        "macs_max": float(macs.max()),
        "macs_static": int(torch_costs(model, example).macs),
        "samples": len(x),
        "measured_on": "test split: per-sample MACs of the conv layers under the gates the model takes "
        "(a skipped output channel saves its filter, a zero input channel its slice of every consumer), "
        "plus the ungated layers and the modules' own MACs",
        "gated_groups": len(controller.groups),
        "mean_keep_rate": {
            g.name: round(float(r), 4) for g, r in zip(controller.groups, keep_rates, strict=True)
        },
    }


def calibration_inputs(data: TensorData, seed: int, n: int = 512) -> torch.Tensor:
    """A fixed random subset of the training inputs (the threshold never sees the test split)."""
    idx = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(seed))[:n]
    return data.x_train[idx]


class SANP:
    def __init__(self, params: SanpParams) -> None:
        self.params = params

    def run(self, ctx: PruneContext) -> MethodResult:
        p = self.params
        target = ctx.spec.target
        if target.kind != "flops":
            raise ValueError("sanp meets an average-MACs budget: give target.flops")
        budget = float(target.fraction)  # type: ignore[arg-type]
        model = ctx.copy_model()
        controller = attach(
            model,
            ctx.dependency_graph(model),
            ctx.groups,
            ctx.example,
            ctx.base_costs.macs,
            p.hidden_ratio,
        )
        rec = ctx.spec.recovery
        history = train_jointly(
            model,
            controller,
            ctx.data,
            budget,
            epochs=p.epochs,
            cost_weight=p.cost_weight,
            lr=rec.base_lr,
            spm_lr=p.spm_lr,
            batch_size=rec.method_batch,
            optimizer=rec.optimizer,
            momentum=rec.momentum,
            weight_decay=rec.weight_decay,
            seed=ctx.seed,
            device=ctx.device,
            noise=p.noise,
            progress=lambda f, m: ctx.progress(0.9 * f, m),
        )
        model.cpu()
        details: dict[str, Any] = {
            "joint_training": history,
            "gated_groups": [g.name for g in controller.groups],
            "spm_macs": controller.spm_macs,
        }
        if p.calibrate:
            details["calibration_after_training"] = calibrate(
                model, controller, calibration_inputs(ctx.data, ctx.seed), budget
            )
        # Recovery trains the backbone under a fixed policy: the modules are frozen and the
        # gates are hard decisions (no straight-through path into the backbone).
        for q in controller.spms.parameters():
            q.requires_grad_(False)
        controller.straight_through = False
        notes = [
            "dynamic model: per-sample channel gating (Saliency-and-Pruning Modules) stays in the exported "
            "graph; every channel is still computed and then multiplied by 0/1, so onnxruntime latency does "
            "not fall — the MACs saved are those a gated kernel would skip (see the dynamic block)",
            "SPM design from the paper's abstract and METHODS.md (no public code; the paper body was not available)",
        ]

        def measure(original: nn.Module, recovered: nn.Module, data: TensorData) -> dict[str, Any]:
            recovered.cpu()
            out: dict[str, Any] = {}
            if p.calibrate:
                out["calibration_after_recovery"] = calibrate(
                    recovered, controller, calibration_inputs(data, ctx.seed), budget
                )
            out["dynamic"] = dynamic_report(recovered, controller, data.x_test, ctx.example)
            out["dynamic"]["macs_before"] = ctx.base_costs.macs
            out["dynamic"]["macs_mean_fraction"] = round(
                out["dynamic"]["macs_mean"] / ctx.base_costs.macs, 5
            )
            return out

        return MethodResult(
            model, details=details, notes=notes, dynamic=True, post_recovery=measure
        )
