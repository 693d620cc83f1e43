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
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from workers.engine.flops import torch_costs
from workers.engine.method import MethodResult, PruneContext
from workers.engine.train import TensorData, make_optimizer
from workers.errors import NotApplicable
from workers.methods.catalog import SanpParams
from workers.methods.channel_maps import GroupChannels, broadcast_factor, group_channels

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# The straight-through backward pass uses sigmoid(logit / T): a wide surrogate, so a gate
# far on the closed side still gets a gradient and a closed layer can reopen.
SURROGATE_TEMPERATURE = 2.0


class SaliencyPruningModule(nn.Module):
    """Global average pool of a layer's input → FC → ReLU → FC: a saliency logit per channel."""

    def __init__(self, in_channels: int, channels: int, hidden: int, init_keep: float = 2.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)
        with torch.no_grad():
            # Start by keeping every channel (logit +2): the backbone starts as the original.
            self.fc2.weight.mul_(0.1)
            self.fc2.bias.fill_(init_keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean(dim=tuple(range(2, x.dim()))) if x.dim() > 2 else x
        return self.fc2(F.relu(self.fc1(pooled)))

    @property
    def macs(self) -> int:
        return self.fc1.in_features * self.fc1.out_features + self.fc2.in_features * self.fc2.out_features


class _LayerCost:
    """Per-sample MACs of one Conv/Linear under the gates of the groups it touches."""

    def __init__(self, name: str, module: nn.Module, macs: int) -> None:
        self.name = name
        self.macs = macs
        self.conv_groups = module.groups if isinstance(module, _CONVS) else 1
        self.outs: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self.ins: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    @staticmethod
    def _factor(maps, gates: list[torch.Tensor]) -> torch.Tensor | None:
        out = None
        for gi, p, base in maps:
            f = gates[gi] @ p + base
            out = f if out is None else out * f
        return out

    def per_sample(self, gates: list[torch.Tensor], batch: int) -> torch.Tensor:
        g_out = self._factor(self.outs, gates)
        g_in = self._factor(self.ins, gates)
        ref = gates[0]
        if g_in is None:
            in_frac = torch.ones(batch, 1, device=ref.device, dtype=ref.dtype)
        else:
            in_frac = g_in.reshape(batch, self.conv_groups, -1).mean(-1)  # [B, G]
        if g_out is None:
            frac = in_frac.mean(-1)
        else:
            frac = (g_out.reshape(batch, self.conv_groups, -1) * in_frac[..., None]).mean(dim=(1, 2))
        return self.macs * frac


class GateController(nn.Module):
    """The SPMs of a model and the hooks that run them: a pre-hook on each group's first
    conv computes the gates from its input; forward hooks on the group's out-pruned convs
    multiply their outputs by the gates. `current` holds the last forward's gates."""

    def __init__(
        self,
        model: nn.Module,
        groups: list[GroupChannels],
        sources: list[str],
        per_layer_macs: dict[str, int],
        base_macs: int,
        hidden_ratio: float = 0.25,
        min_keep: float = 0.1,
    ) -> None:
        super().__init__()
        self.groups = groups
        self.sources = sources
        self.base_macs = base_macs
        self.spms = nn.ModuleList()
        for g, src in zip(groups, sources, strict=True):
            cin = model.get_submodule(src).in_channels
            hidden = max(4, math.ceil(g.channels * hidden_ratio))
            self.spms.append(SaliencyPruningModule(cin, g.channels, hidden))
        self.floor_k = [max(1, math.ceil(min_keep * g.channels)) for g in groups]
        self.offset = 0.0  # global shift of the logits (calibration), folded before export
        self.explore = False  # logistic noise on the logits (joint training only)
        self.straight_through = True
        self.current: list[torch.Tensor | None] = [None] * len(groups)
        self.soft: list[torch.Tensor | None] = [None] * len(groups)  # surrogate keep probabilities (training)
        self._handles = []
        self._gated_outputs: dict[str, list[tuple[int, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]]] = {}
        for gi, g in enumerate(groups):
            for cmap in g.outs:
                if cmap.is_identity(g.channels):
                    entry = (gi, None, None, None)
                elif cmap.is_gather():
                    entry = (gi, cmap.gather_index(), None, None)
                else:
                    p, base = cmap.projection(g.channels)
                    entry = (gi, None, p, base)
                self._gated_outputs.setdefault(cmap.module, []).append(entry)
        for gi, src in enumerate(sources):
            self._handles.append(model.get_submodule(src).register_forward_pre_hook(self._pre_hook(gi)))
        for name in self._gated_outputs:
            self._handles.append(model.get_submodule(name).register_forward_hook(self._hook(name)))
        # The cost model.
        modules = dict(model.named_modules())
        self.costs: dict[str, _LayerCost] = {}
        for gi, g in enumerate(groups):
            for role, maps in (("out", g.outs), ("in", g.ins)):
                for cmap in maps:
                    if cmap.module not in self.costs:
                        self.costs[cmap.module] = _LayerCost(
                            cmap.module, modules[cmap.module], per_layer_macs.get(cmap.module, 0)
                        )
                    p, base = cmap.projection(g.channels)
                    (self.costs[cmap.module].outs if role == "out" else self.costs[cmap.module].ins).append((gi, p, base))
        self.fixed_macs = base_macs - sum(c.macs for c in self.costs.values())
        self.spm_macs = sum(m.macs for m in self.spms)

    # -------------------------------------------------------------- gating
    def _gate(self, logits: torch.Tensor, gi: int) -> torch.Tensor:
        logits = logits + self.offset
        if self.explore and self.training:
            u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
            logits = logits + torch.log(u) - torch.log1p(-u)
        # Keep a channel when its logit is positive, and always the group's top `floor_k`
        # (as the static allocator never empties a layer): no sample loses a whole layer.
        k = self.floor_k[gi]
        kth = torch.topk(logits, k, dim=1).values[:, k - 1 : k]
        hard = ((logits > 0) | (logits >= kth)).to(logits.dtype)
        if self.training and self.straight_through:
            soft = torch.sigmoid(logits / SURROGATE_TEMPERATURE)
            self.soft[gi] = soft
            return hard + soft - soft.detach()
        return hard

    def _pre_hook(self, gi: int):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            self.current[gi] = self._gate(self.spms[gi](inputs[0]), gi)

        return hook

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
            factor = None
            for gi, index, p, base in self._gated_outputs[name]:
                g = self.current[gi]
                assert g is not None
                if index is not None:
                    f = g.index_select(1, index)
                elif p is not None:
                    f = g @ p + base
                else:
                    f = g
                factor = f if factor is None else factor * f
            return output * broadcast_factor(factor, output, 1)

        return hook

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # -------------------------------------------------------------- cost
    def macs_per_sample(self, gates: list[torch.Tensor] | None = None) -> torch.Tensor:
        gates = [g for g in (gates if gates is not None else self.current)]  # type: ignore[misc]
        batch = gates[0].shape[0]
        total = torch.full((batch,), float(self.fixed_macs + self.spm_macs), device=gates[0].device)
        moved = self._moved(gates[0].device)
        for cost in moved:
            total = total + cost.per_sample(gates, batch)
        return total

    def _moved(self, device: torch.device) -> list[_LayerCost]:
        if getattr(self, "_device", None) != device:
            for cost in self.costs.values():
                cost.outs = [(gi, p.to(device), b.to(device)) for gi, p, b in cost.outs]
                cost.ins = [(gi, p.to(device), b.to(device)) for gi, p, b in cost.ins]
            self._device = device
        return list(self.costs.values())

    def fold_offset(self) -> None:
        with torch.no_grad():
            for spm in self.spms:
                spm.fc2.bias.add_(self.offset)
        self.offset = 0.0


def first_to_run(model: nn.Module, example: torch.Tensor, names: set[str]) -> list[str]:
    """The modules of `names` in the order a forward pass calls them."""
    order: list[str] = []
    handles = []
    for name in names:
        def hook(module, inputs, name=name):
            if name not in order:
                order.append(name)

        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return order


def attach(model: nn.Module, dg, groups, example: torch.Tensor, base_macs: int, hidden_ratio: float) -> GateController:
    """Give every group whose out-pruned layers are all convs an SPM; returns the controller
    (registered as `model.sanp`, so `model` must not be an nn.Sequential, which would call
    it; the engine's models are fx GraphModules)."""
    per_layer = torch_costs(model, example).per_layer
    maps = [g for g in group_channels(model, dg, groups)
            if all(isinstance(model.get_submodule(c.module), _CONVS) for c in g.outs)]
    if not maps:
        raise NotApplicable(
            "sanp gates the output channels of convolutions, and no convolution of this model has "
            "channels that can be removed safely (see the excluded layers); use a static method such "
            "as l1_norm or thinet for its other layers"
        )
    order = first_to_run(model, example, {c.module for g in maps for c in g.outs})
    rank = {n: i for i, n in enumerate(order)}
    sources = [min((c.module for c in g.outs), key=lambda n: rank.get(n, 1 << 30)) for g in maps]
    controller = GateController(model, maps, sources, per_layer, base_macs, hidden_ratio)
    model.add_module("sanp", controller)
    return controller


@torch.no_grad()
def measure_macs(model: nn.Module, controller: GateController, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Per-sample MACs of the hard gate decisions the model takes on x."""
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        model(x[i : i + batch_size])
        out.append(controller.macs_per_sample())
    return torch.cat(out)


def calibrate(model: nn.Module, controller: GateController, x: torch.Tensor, target: float, iters: int = 18) -> dict[str, float]:
    """Bisection on the logits' global shift so that the mean MACs fraction on x is the target."""
    base = float(controller.base_macs)

    def frac(offset: float) -> float:
        controller.offset = offset
        return float(measure_macs(model, controller, x).mean()) / base

    lo, hi = -8.0, 8.0
    while frac(lo) > target and lo > -1e4:
        lo *= 2
    while frac(hi) < target and hi < 1e4:
        hi *= 2
    best = (abs(frac(0.0) - target), 0.0)
    for _ in range(iters):
        mid = (lo + hi) / 2
        f = frac(mid)
        best = min(best, (abs(f - target), mid))
        if f > target:
            hi = mid
        else:
            lo = mid
    controller.offset = best[1]
    achieved = frac(best[1])
    controller.fold_offset()
    return {"shift": round(best[1], 5), "mean_macs_fraction_on_calibration": round(achieved, 5)}


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
    opts = [torch.optim.Adam(spm_params, lr=spm_lr)]
    if train_backbone and backbone:
        opts.append(make_optimizer(backbone, optimizer, lr, momentum, weight_decay))
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    base = float(controller.base_macs)
    history: list[dict[str, float]] = []
    steps_total = epochs * math.ceil(len(data.x_train) / batch_size)
    step = 0
    controller.explore = noise
    try:
        for epoch in range(epochs):
            model.train()
            sums = {"ce": 0.0, "macs_fraction": 0.0}
            n = 0
            for xb, yb in data.batches(batch_size, gen):
                xb, yb = xb.to(device), yb.to(device)
                logits = model(xb)
                ce = F.cross_entropy(logits, yb)
                frac = controller.macs_per_sample().mean() / base
                # A floor on each group's mean keep rate: a layer gated off for every sample
                # has a vanishing straight-through gradient and would never come back.
                floor = sum(F.relu(min_keep - p.mean()) ** 2 for p in controller.soft)  # type: ignore[union-attr]
                loss = ce + cost_weight * ((frac - target) ** 2 + floor)
                if not torch.isfinite(loss):
                    raise FloatingPointError("SANP joint training diverged; lower recovery.lr or spm_lr")
                for o in opts:
                    o.zero_grad(set_to_none=True)
                loss.backward()
                for o in opts:
                    o.step()
                sums["ce"] += float(ce.detach())
                sums["macs_fraction"] += float(frac.detach())
                n += 1
                step += 1
                if progress is not None:
                    progress(step / max(steps_total, 1), f"SANP joint training: epoch {epoch + 1}/{epochs}")
            history.append({k: round(v / max(n, 1), 5) for k, v in sums.items()})
    finally:
        controller.explore = False
        model.eval()
    return history


def dynamic_report(model: nn.Module, controller: GateController, x: torch.Tensor, example: torch.Tensor) -> dict[str, Any]:
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
        "mean_keep_rate": {g.name: round(float(r), 4) for g, r in zip(controller.groups, keep_rates, strict=True)},
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
        controller = attach(model, ctx.dependency_graph(model), ctx.groups, ctx.example, ctx.base_costs.macs, p.hidden_ratio)
        rec = ctx.spec.recovery
        history = train_jointly(
            model, controller, ctx.data, budget, epochs=p.epochs, cost_weight=p.cost_weight, lr=rec.lr,
            spm_lr=p.spm_lr, batch_size=rec.batch_size, optimizer=rec.optimizer, momentum=rec.momentum,
            weight_decay=rec.weight_decay, seed=ctx.seed, device=ctx.device, noise=p.noise,
            progress=lambda f, m: ctx.progress(0.9 * f, m),
        )
        model.cpu()
        details: dict[str, Any] = {"joint_training": history, "gated_groups": [g.name for g in controller.groups],
                                   "spm_macs": controller.spm_macs}
        if p.calibrate:
            details["calibration_after_training"] = calibrate(model, controller, calibration_inputs(ctx.data, ctx.seed), budget)
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
                out["calibration_after_recovery"] = calibrate(recovered, controller, calibration_inputs(data, ctx.seed), budget)
            out["dynamic"] = dynamic_report(recovered, controller, data.x_test, ctx.example)
            out["dynamic"]["macs_before"] = ctx.base_costs.macs
            out["dynamic"]["macs_mean_fraction"] = round(out["dynamic"]["macs_mean"] / ctx.base_costs.macs, 5)
            return out

        return MethodResult(model, details=details, notes=notes, dynamic=True, post_recovery=measure)
