"""sanp's gates: the Saliency-and-Pruning Modules, the controller whose hooks run them and
gate the convs' outputs (through `engine.channels.gate_output`), the per-sample MACs model,
and the calibration of the decision threshold. See `impl.py` for the method."""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import NotApplicable
from engine.channels import GroupChannels, gate_output, group_channels
from engine.flops import torch_costs

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# The straight-through backward pass uses sigmoid(logit / T): a wide surrogate, so a gate
# far on the closed side still gets a gradient and a closed layer can reopen.
SURROGATE_TEMPERATURE = 2.0


class SaliencyPruningModule(nn.Module):
    """Global average pool of a layer's input → FC → ReLU → FC: a saliency logit per channel."""

    def __init__(
        self, in_channels: int, channels: int, hidden: int, init_keep: float = 2.0
    ) -> None:
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
        return (
            self.fc1.in_features * self.fc1.out_features
            + self.fc2.in_features * self.fc2.out_features
        )


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
            frac = (g_out.reshape(batch, self.conv_groups, -1) * in_frac[..., None]).mean(
                dim=(1, 2)
            )
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
            cin = cast(int, model.get_submodule(src).in_channels)
            hidden = max(4, math.ceil(g.channels * hidden_ratio))
            self.spms.append(SaliencyPruningModule(cin, g.channels, hidden))
        self.floor_k = [max(1, math.ceil(min_keep * g.channels)) for g in groups]
        self.offset = 0.0  # global shift of the logits (calibration), folded before export
        self.explore = False  # logistic noise on the logits (joint training only)
        self.straight_through = True
        self.current: list[torch.Tensor | None] = [None] * len(groups)
        self.soft: list[torch.Tensor | None] = [None] * len(
            groups
        )  # surrogate keep probabilities (training)
        self._handles = []
        self._gated_outputs: dict[
            str, list[tuple[int, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]]
        ] = {}
        for gi, g in enumerate(groups):
            for cmap in g.outs:
                entry: tuple[int, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]
                if cmap.is_identity(g.channels):
                    entry = (gi, None, None, None)
                elif cmap.is_gather():
                    entry = (gi, cmap.gather_index(), None, None)
                else:
                    p, base = cmap.projection(g.channels)
                    entry = (gi, None, p, base)
                self._gated_outputs.setdefault(cmap.module, []).append(entry)
        for gi, src in enumerate(sources):
            self._handles.append(
                model.get_submodule(src).register_forward_pre_hook(self._pre_hook(gi))
            )
        for name in self._gated_outputs:
            self._handles.append(gate_output(model.get_submodule(name), self._gate_of(name)))
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
                    (
                        self.costs[cmap.module].outs
                        if role == "out"
                        else self.costs[cmap.module].ins
                    ).append((gi, p, base))
        self.fixed_macs = base_macs - sum(c.macs for c in self.costs.values())
        self.spm_macs = sum(cast(SaliencyPruningModule, m).macs for m in self.spms)

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

    def _gate_of(self, name: str):
        def gate(output: torch.Tensor) -> torch.Tensor | None:
            factor = None
            for gi, index, p, base in self._gated_outputs[name]:
                g = self.current[gi]
                assert g is not None
                if index is not None:
                    f = g.index_select(1, index)
                elif p is not None:
                    assert base is not None  # a projection always comes with its base
                    f = g @ p + base
                else:
                    f = g
                factor = f if factor is None else factor * f
            return factor

        return gate

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
                cast(SaliencyPruningModule, spm).fc2.bias.add_(self.offset)
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


def attach(
    model: nn.Module, dg, groups, example: torch.Tensor, base_macs: int, hidden_ratio: float
) -> GateController:
    """Give every group whose out-pruned layers are all convs an SPM; returns the controller
    (registered as `model.sanp`, so `model` must not be an nn.Sequential, which would call
    it; the engine's models are fx GraphModules)."""
    per_layer = torch_costs(model, example).per_layer
    maps = [
        g
        for g in group_channels(model, dg, groups)
        if all(isinstance(model.get_submodule(c.module), _CONVS) for c in g.outs)
    ]
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
def measure_macs(
    model: nn.Module, controller: GateController, x: torch.Tensor, batch_size: int = 256
) -> torch.Tensor:
    """Per-sample MACs of the hard gate decisions the model takes on x."""
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        model(x[i : i + batch_size])
        out.append(controller.macs_per_sample())
    return torch.cat(out)


def calibrate(
    model: nn.Module, controller: GateController, x: torch.Tensor, target: float, iters: int = 18
) -> dict[str, float]:
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
