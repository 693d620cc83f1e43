"""pruning_from_scratch (Wang, Zhang, Zhang, Chang, Wang, Huang. Pruning from Scratch. AAAI 2020).

The uploaded weights are used only for the structure. A copy is re-initialised at random
and frozen; a gate (init 1, clamped to [0, 1]) sits on every channel of every prunable
group, and only the gates are trained, with

    loss = CE + lambda * (mean|g| - r)^2          (Adam, lr gate_lr)

The gates of the best epoch (lowest CE) among the epochs whose mean|g| reached r are kept.
One global ratio p is then binary-searched: the global top-(1 - p) gates are kept, the
per-group widths follow, and the MACs (or parameters) of those widths are counted, until
the budget is met. The architecture is returned with recovery="scratch": the engine
re-initialises it and trains it from scratch, as the paper does.

`expand` > 1 widens every group (by repeating its channels, `methods.expand`)
before the gates are learned, as the authors do with their width multiplier; a channel is
kept when any of its copies is, so each group's final width is capped at its original width
(the result must be a pruning of the uploaded graph).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from engine.method import MethodResult, PruneContext, widths_to_plan
from methods.base.widths import ChannelSites, WidthCost, curves_png, round_width, widths_table
from methods.pruning_from_scratch import PruningFromScratchParams

# Gate epochs count as having reached the sparsity r when mean|g| <= r + this slack.
SPARSITY_SLACK = 0.01
# As every method in the engine: no group loses more than this fraction of its channels.
MAX_LAYER_RATIO = 0.9


def random_init(model: nn.Module, seed: int) -> None:
    """He-normal weights, zero biases. The authors' networks have BatchNorm after every conv,
    which keeps a random network's activations at unit scale; the uploaded graph has its
    BatchNorm folded away, so the variance-preserving init plays that role (with PyTorch's
    default init the logits of a deep random net shrink to ~0 and CE gives the gates no signal)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * math.sqrt(2.0 / fan_in))
                if m.bias is not None:
                    m.bias.zero_()


def gate_penalty(gates: list[torch.Tensor], r: float) -> torch.Tensor:
    """(mean|g| - r)^2 over all gates of the network."""
    return (torch.cat([g.abs().reshape(-1) for g in gates]).mean() - r) ** 2


def learn_gates(
    ctx: PruneContext,
    net: nn.Module,
    lam: float,
    r: float,
    epochs: int,
    lr: float,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Train only per-channel gates of `net` (its weights frozen). Returns the gates of the
    selected epoch and the per-epoch history."""
    dg = ctx.dependency_graph(net)  # before freezing: the tracer follows gradients
    for p in net.parameters():
        p.requires_grad_(False)
    sites = ChannelSites(net, dg, ctx.groups)
    gates = {g.name: nn.Parameter(torch.ones(g.channels, device=ctx.device)) for g in ctx.groups}
    sites.attach(lambda name: gates[name])
    cost = WidthCost(net, dg, ctx.groups, ctx.base_costs, "flops")
    penalties: list[float] = []
    history: dict[str, Any] = {"loss": [], "ce": [], "mean_gate": [], "soft_macs": []}
    snapshots: list[dict[str, torch.Tensor]] = []

    def extra_loss(model, x, y, logits):
        pen = gate_penalty(list(gates.values()), r)
        penalties.append(float(pen.detach()))
        return lam * pen

    def clamp(_model):
        with torch.no_grad():
            for g in gates.values():
                g.clamp_(0.0, 1.0)

    def on_epoch(epoch: int, loss: float) -> None:
        with torch.no_grad():
            mean = float(torch.cat([g.abs() for g in gates.values()]).mean())
            soft = float(cost.fraction({k: g.sum() for k, g in gates.items()}))
        pen = sum(penalties) / max(len(penalties), 1)
        penalties.clear()
        history["loss"].append(loss)
        history["ce"].append(loss - lam * pen)
        history["mean_gate"].append(mean)
        history["soft_macs"].append(soft)
        snapshots.append({k: g.detach().cpu().clone() for k, g in gates.items()})
        ctx.progress(
            0.8 * (epoch + 1) / epochs,
            f"gates epoch {epoch + 1}/{epochs}: mean|g| {mean:.3f}, loss {loss:.4f}",
        )

    try:
        ctx.train(
            net,
            epochs,
            lr=lr,
            params=list(gates.values()),
            optimizer="adam",
            weight_decay=0.0,
            schedule="constant",
            extra_loss=extra_loss,
            after_step=clamp,
            on_epoch=on_epoch,
        )
    finally:
        sites.detach()
    reached = [i for i, m in enumerate(history["mean_gate"]) if m <= r + SPARSITY_SLACK]
    if reached:
        best = min(reached, key=lambda i: history["ce"][i])
    else:  # never reached r: the epoch closest to it
        best = min(range(len(snapshots)), key=lambda i: history["mean_gate"][i])
    history.update(selected_epoch=best + 1, reached_sparsity=bool(reached))
    return snapshots[best], history


def global_widths(
    gates: dict[str, torch.Tensor], channels: dict[str, int], removed: int, round_to: int
) -> dict[str, int]:
    """Widths after removing the `removed` globally smallest gates (ties by position), each
    group keeping at least max(round_to, 10%) of its channels."""
    names = list(gates)
    values = torch.cat([gates[n].double() for n in names])
    owner = torch.cat(
        [torch.full((channels[n],), i, dtype=torch.long) for i, n in enumerate(names)]
    )
    order = torch.argsort(values, stable=True)[:removed]
    counts = torch.bincount(owner[order], minlength=len(names)).tolist()
    widths = {}
    for n, c in zip(names, counts, strict=True):
        keep_min = max(round_to, math.ceil(channels[n] * (1.0 - MAX_LAYER_RATIO)))
        widths[n] = max(keep_min, round_width(channels[n] - c, channels[n], round_to))
    return widths


def search_ratio(
    cost,
    gates,
    channels,
    target: float,
    round_to: int,
    tolerance: float = 0.001,
    max_steps: int = 16,
):
    """Binary search of the global pruning ratio p = removed / all gates."""
    total = sum(channels.values())
    trace = []

    def kept(n: int) -> float:
        w = global_widths(gates, channels, n, round_to)
        f = float(cost.fraction(w))
        trace.append({"ratio": round(n / total, 5), "kept": round(f, 5)})
        return f

    lo, hi = 0, total  # kept(lo) > target >= kept(hi) if reachable
    best_n, best_f = 0, kept(0)
    for _ in range(max_steps):
        if hi - lo <= 1:
            break
        mid = (lo + hi) // 2
        f = kept(mid)
        if abs(f - target) < abs(best_f - target):
            best_n, best_f = mid, f
        if abs(f - target) <= tolerance:
            break
        if f > target:
            lo = mid
        else:
            hi = mid
    f_hi = kept(hi)
    if abs(f_hi - target) < abs(best_f - target):
        best_n, best_f = hi, f_hi
    return best_n / total, global_widths(gates, channels, best_n, round_to), best_f, trace


class PruningFromScratch:
    def __init__(self, params: PruningFromScratchParams) -> None:
        self.params = params

    @staticmethod
    def _choose_widths(
        ctx: PruneContext, gates: dict[str, torch.Tensor], notes: list[str]
    ) -> tuple[nn.Module, dict[str, int], dict]:
        """The pruned model, its widths and the search details: the global gate threshold
        that meets a flops/params target (the engine's global search when it misses, or
        for latency and per-layer targets)."""
        target = ctx.spec.target
        channels = {g.name: g.channels for g in ctx.groups}
        details: dict = {}
        if target.layers is not None or target.kind == "latency":  # latency: measured, not counted
            pruned, plan, details = ctx.prune_to_budget(gates, "global")
            widths = {g.name: g.channels - len(plan.get(g.name, [])) for g in ctx.groups}
        else:
            cost = WidthCost(
                ctx.model, ctx.dependency_graph(), ctx.groups, ctx.base_costs, target.kind
            )
            fraction = target.fraction
            assert fraction is not None  # a flops or params target
            ratio, widths, predicted, trace = search_ratio(
                cost, gates, channels, float(fraction), ctx.round_to
            )
            pruned = ctx.prune_plan(widths_to_plan(ctx.groups, gates, widths))
            c = ctx.costs(pruned)
            kept = (
                c.macs / ctx.base_costs.macs
                if target.kind == "flops"
                else c.params / ctx.base_costs.params
            )
            details.update(
                global_ratio=round(ratio, 5),
                ratio_search=trace,
                search_steps=len(trace),
                kept_torch_count=round(kept, 6),
            )
            if abs(kept - float(fraction)) > target.tolerance:
                notes.append(
                    f"the global gate threshold reaches {kept:.4f}; fell back to the engine's global search"
                )
                pruned, plan, more = ctx.prune_to_budget(gates, "global")
                details.update(fallback=more)
                widths = {g.name: g.channels - len(plan.get(g.name, [])) for g in ctx.groups}
        return pruned, widths, details

    def run(self, ctx: PruneContext) -> MethodResult:
        p = self.params
        notes: list[str] = []
        net = ctx.copy_model()
        gate_ctx, origin = ctx, None
        if p.expand != 1.0:
            from methods.pruning_from_scratch.expand import expanded_context

            gate_ctx, net, origin, skipped = expanded_context(ctx, net, p.expand)
            notes.append(
                f"gates learned on the network widened x{p.expand} (channels repeated); "
                "a channel is kept when any of its copies is, so widths are capped at the original"
                + (f"; groups left at their width: {', '.join(skipped)}" if skipped else "")
            )
        random_init(net, ctx.seed)  # the uploaded weights give only the structure
        gates, history = learn_gates(
            gate_ctx, net, p.lambda_, p.sparsity_level, p.gate_epochs, p.gate_lr
        )
        if origin is not None:  # copies of a channel: it is kept if any copy is
            gates = {
                g.name: torch.zeros(g.channels).index_reduce_(
                    0, origin[g.name], gates[g.name], "amax", include_self=False
                )
                for g in ctx.groups
            }
        if not history["reached_sparsity"]:
            notes.append(
                f"the gates never reached mean {p.sparsity_level} in {p.gate_epochs} epochs; "
                f"used epoch {history['selected_epoch']} (closest): raise gate_epochs or lambda"
            )
        ctx.progress(0.85, "searching the global ratio")
        pruned, widths, details = self._choose_widths(ctx, gates, notes)
        curves = {
            "loss": {"CE + penalty": history["loss"], "CE": history["ce"]},
            "gates": {
                "mean |g|": history["mean_gate"],
                "target r": [p.sparsity_level] * len(history["loss"]),
            },
            "soft MACs (widths = sum of gates)": {"fraction of original": history["soft_macs"]},
        }
        png = curves_png(
            f"Pruning from Scratch: gate learning (lambda {p.lambda_}, r {p.sparsity_level})",
            curves,
        )
        details.update(
            widths=widths_table(ctx.groups, widths),
            search_curves={
                k: [round(v, 6) for v in history[k]]
                for k in ("loss", "ce", "mean_gate", "soft_macs")
            },
            selected_epoch=history["selected_epoch"],
            reached_sparsity=history["reached_sparsity"],
            gate_histogram=torch.histc(torch.cat(list(gates.values())), bins=10, min=0, max=1)
            .int()
            .tolist(),
        )
        return MethodResult(
            copy.deepcopy(pruned),
            details=details,
            recovery="scratch",
            notes=notes,
            artifacts={"search_curves.png": png},
        )
