"""network_slimming (Liu et al. 2017): sparsity-trained channel scale factors, one global
threshold.

The paper regularises BatchNorm's γ. An uploaded ONNX graph usually has BatchNorm folded
into the conv, so a per-channel scale gate (initialised to 1) is put on the output of every
conv/linear whose output channels a prunable group removes — with a forward hook, so the
converted graph itself is untouched. The network and the gates are trained for
`sparsity_epochs` with `s * sign(gate)` added to each gate's gradient (the L1
subgradient). A channel's score is its |gate|; channels coupled by a residual or concat
group have one gate per producing layer, and their score is the mean of those |gates|,
so that one threshold compares channels of every group on the same scale.

One global threshold: every channel (chunk of `round_to` channels) is ordered by raw
score across all groups — no per-layer normalisation — and the engine's budget search
finds the prefix, i.e. the threshold, at which the MACs/params target is met. As in the
paper no layer is emptied (each keeps at least 10% of its channels). Finally the gates are
folded into their layers (W[c] *= g[c], b[c] *= g[c]) and the hooks removed, so the
exported graph has exactly the ops of the original.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from core.errors import EngineError
from engine import budget
from engine.channels import GateFn, gate_output, group_layers
from engine.graph import ChannelGroup, full_group
from engine.method import MethodResult, PruneContext
from methods.network_slimming import NetworkSlimmingParams

GATED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_Gated = nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear
MAX_LAYER_RATIO = 0.9


def _out_width(module: _Gated) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


class ChannelGates:
    """Per-output-channel scale gates on the producing layers of the given groups."""

    def __init__(
        self,
        model: nn.Module,
        dg,
        groups: Sequence[ChannelGroup],
        device: torch.device | str = "cpu",
    ) -> None:
        self.model = model
        self.gates: dict[str, nn.Parameter] = {}
        self.modules: dict[str, _Gated] = {}
        # group -> [(layer, layer channel idxs, root channel idxs)]
        self.members: dict[str, list[tuple[str, torch.Tensor, torch.Tensor]]] = {}
        names = {m: n for n, m in model.named_modules()}
        for g in groups:
            rows = []
            for lc in group_layers(dg, full_group(model, dg, g.name), names):
                if lc.role != "out" or not isinstance(lc.module, GATED) or lc.name is None:
                    continue
                if lc.name not in self.gates:
                    width = _out_width(lc.module)
                    self.gates[lc.name] = nn.Parameter(torch.ones(width, device=device))
                    self.modules[lc.name] = lc.module
                rows.append((lc.name, torch.as_tensor(lc.idxs), torch.as_tensor(lc.roots)))
            if not rows:
                raise EngineError(
                    f"network_slimming: group {g.name} has no Conv/Linear producing its channels to gate"
                )
            self.members[g.name] = rows
        self._handles = [gate_output(m, self._gate(n)) for n, m in self.modules.items()]

    def _gate(self, name: str) -> GateFn:
        return lambda _output: self.gates[name]

    def parameters(self) -> list[nn.Parameter]:
        return list(self.gates.values())

    def l1_subgradient(self, s: float):
        """after_backward hook: grad(g) += s * sign(g)."""

        def add(_model: nn.Module) -> None:
            for g in self.gates.values():
                if g.grad is None:
                    g.grad = torch.zeros_like(g)
                g.grad.add_(s * torch.sign(g.detach()))

        return add

    def scores(self) -> dict[str, torch.Tensor]:
        """Per group: the mean |gate| over the coupled producing layers, in root order."""
        out: dict[str, torch.Tensor] = {}
        for group, rows in self.members.items():
            n = int(max(int(r.max()) for _, _, r in rows)) + 1
            total = torch.zeros(n, dtype=torch.float64)
            count = torch.zeros(n, dtype=torch.float64)
            for name, idxs, roots in rows:
                total.index_add_(0, roots, self.gates[name].detach().abs().double().cpu()[idxs])
                count.index_add_(0, roots, torch.ones(len(roots), dtype=torch.float64))
            out[group] = total / count.clamp_min(1)
        return out

    @torch.no_grad()
    def fold(self) -> None:
        """W[c] *= g[c], b[c] *= g[c]; then remove the hooks (the graph is unchanged)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        for name, module in self.modules.items():
            g = self.gates[name].detach().to(module.weight.device, module.weight.dtype)
            module.weight.mul_(g.view(-1, *([1] * (module.weight.dim() - 1))))
            if module.bias is not None:
                module.bias.mul_(g)


def threshold_chunks(
    groups: Sequence[ChannelGroup],
    scores: dict[str, torch.Tensor],
    round_to: int = 1,
    max_ratio: float = MAX_LAYER_RATIO,
) -> list[budget.Chunk]:
    """All groups' channels in one order by raw score: a prefix of it is exactly the set
    under a global threshold (chunks of round_to; each group keeps >= 10%)."""
    chunks: list[budget.Chunk] = []
    for g in groups:
        s = scores[g.name].double()
        order = torch.argsort(s, stable=True).tolist()
        keep_min = max(round_to, math.ceil(g.channels * (1.0 - max_ratio)))
        removable = max(0, g.channels - keep_min)
        pos, first = 0, g.channels % round_to
        size = first if first else round_to
        while pos + size <= removable:
            chunk = order[pos : pos + size]
            chunks.append(budget.Chunk(g.name, chunk, float(s[chunk].max())))
            pos += size
            size = round_to
    chunks.sort(key=lambda ch: ch.key)  # stable: ties keep group order
    return chunks


def prune_at_global_threshold(ctx: PruneContext, model: nn.Module, scores: dict[str, torch.Tensor]):
    """Search the global threshold that meets the spec's target; (pruned, plan, details)."""
    target = ctx.spec.target
    groups = [g for g in ctx.groups if g.name in scores]
    if target.layers is not None:  # explicit per-layer ratios: no threshold to choose
        return ctx.prune_to_budget(scores, "uniform", model=model)
    if target.kind == "latency":  # one global ranking, spent against measured latency
        return ctx.prune_to_budget(scores, "global", model=model)
    chunks = threshold_chunks(groups, scores, ctx.round_to)
    fraction = target.fraction
    assert fraction is not None  # a flops or params target
    result = budget.search(
        model,
        ctx.example,
        chunks,
        target.kind,
        float(fraction),
        ctx.base_costs,
        progress=lambda f: ctx.progress(0.6 + 0.4 * f, None),
        tolerance=target.tolerance,
    )
    removed = {(k, i) for k, v in result.plan.items() for i in v}
    kept_scores = [
        float(scores[g.name][i])
        for g in groups
        for i in range(g.channels)
        if (g.name, i) not in removed
    ]
    threshold = max((ch.key for ch in chunks if (ch.group, ch.idxs[0]) in removed), default=None)
    return (
        result.model,
        result.plan,
        {
            "allocation": "global threshold",
            "evaluations": result.evaluations,
            "kept_torch_count": result.kept,
            "threshold": threshold,
            "lowest_kept_score": min(kept_scores) if kept_scores else None,
        },
    )


class NetworkSlimming:
    def __init__(self, params: NetworkSlimmingParams) -> None:
        self.params = params

    def run(self, ctx: PruneContext) -> MethodResult:
        p = self.params
        model = ctx.copy_model()
        gates = ChannelGates(model, ctx.dependency_graph(model), ctx.groups, device=ctx.device)
        curve: list[float] = []
        if p.sparsity_epochs > 0:
            ctx.progress(0.0, f"network_slimming: sparsity training, s={p.s}")
            curve = ctx.train(
                model,
                p.sparsity_epochs,
                params=list(model.parameters()) + gates.parameters(),
                after_backward=gates.l1_subgradient(p.s),
                on_epoch=lambda e, loss: ctx.progress(
                    0.6 * (e + 1) / p.sparsity_epochs, f"sparsity epoch {e + 1} loss {loss:.4f}"
                ),
            )
        model.cpu().eval()
        scores = gates.scores()
        gate_values = torch.cat([g.detach().abs().cpu() for g in gates.parameters()])
        gates.fold()
        pruned, plan, details = prune_at_global_threshold(ctx, model, scores)
        details["removed_channels"] = {k: len(v) for k, v in plan.items() if v}
        details["sparsity_loss_per_epoch"] = [round(v, 5) for v in curve]
        details["gates"] = {
            "count": int(gate_values.numel()),
            "mean_abs": float(gate_values.mean()),
            "below_0.1": int((gate_values < 0.1).sum()),
        }
        return MethodResult(pruned.cpu().eval(), details=details)
