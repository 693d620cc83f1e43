"""flop — Factorized L0 Pruning (Wang, Wohlwend, Lei 2019, "Structured Pruning of Large
Language Models").

Each Linear W (out x in) is factorised from its SVD as W = P diag(z) Q, P = U sqrt(S),
Q = sqrt(S) V^T, with one hard-concrete gate z_k per rank-one component (Louizos et al.'s
stretched, rectified concrete: stretch [-0.1, 1.1], temperature 1.0, initial mean 0.5).
The expected number of non-zero gates is differentiable, so the expected size s of the
factorised layers is controlled by an augmented Lagrangian λ1 (s - t) + λ2 (s - t)^2
whose multipliers are updated by gradient *ascent* (t warmed up linearly from 0). At the
end the components with the largest gates are kept — their number found by binary search
so the spec's target is met on the compiled network — and each Linear is compiled into two
dense ones (in -> r, r -> out), or back into one when that is smaller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from engine import train
from engine.budget import BudgetUnreachable
from engine.method import MethodResult, PruneContext
from engine.train import task_loss
from methods.flop import FlopParams

GAMMA, ZETA = -0.1, 1.1


class FactorizedLinear(nn.Module):
    """y = P diag(z) Q x + b with hard-concrete gates z on the rank-one components."""

    keep: torch.Tensor  # buffer

    def __init__(self, linear: nn.Linear, temperature: float = 1.0, init_mean: float = 0.5) -> None:
        super().__init__()
        w = linear.weight.detach().double()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        root = s.sqrt()
        # P absorbs 1/init_mean so that the deterministic gates (= init_mean at the start)
        # reproduce W exactly: training starts from the trained function.
        self.P = nn.Parameter((u * root / init_mean).float())  # out x r
        self.Q = nn.Parameter((root[:, None] * vh).float())  # r x in
        self.bias = nn.Parameter(linear.bias.detach().clone()) if linear.bias is not None else None
        self.temperature = temperature
        # log_alpha such that the deterministic gate sigmoid(log_alpha)*(ζ-γ)+γ starts at init_mean.
        p = (init_mean - GAMMA) / (ZETA - GAMMA)
        self.log_alpha = nn.Parameter(torch.full((s.numel(),), math.log(p / (1 - p))))
        self.register_buffer("keep", torch.ones(s.numel()))  # a hard mask applied after selection

    @property
    def rank(self) -> int:
        return self.log_alpha.numel()

    def gates(self) -> torch.Tensor:
        if self.training:
            u = torch.rand_like(self.log_alpha).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.temperature)
        else:
            s = torch.sigmoid(self.log_alpha)
        return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0) * self.keep

    def expected_l0(self) -> torch.Tensor:
        """P(z_k != 0) per component (differentiable in log_alpha)."""
        return (
            torch.sigmoid(self.log_alpha - self.temperature * math.log(-GAMMA / ZETA)) * self.keep
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.Q) * self.gates()
        return F.linear(h, self.P, self.bias)

    @torch.no_grad()
    def compile(self, components: torch.Tensor) -> nn.Module:  # type: ignore[override]  # deliberately shadows nn.Module.compile (torch.compile is never used on it)
        """Dense modules for the kept components (indices), gates folded into Q."""
        was = self.training
        self.eval()
        z = self.gates()
        self.train(was)
        out_f, in_f = self.P.shape[0], self.Q.shape[1]
        r = int(components.numel())
        q = z[components, None] * self.Q[components]
        p = self.P[:, components]
        if r * (in_f + out_f) >= in_f * out_f or r == 0:
            dense = nn.Linear(in_f, out_f, bias=self.bias is not None)
            dense.weight.copy_(p @ q if r else torch.zeros(out_f, in_f))
            if self.bias is not None:
                dense.bias.copy_(self.bias)
            return dense
        first = nn.Linear(in_f, r, bias=False)
        second = nn.Linear(r, out_f, bias=self.bias is not None)
        first.weight.copy_(q)
        second.weight.copy_(p)
        if self.bias is not None:
            second.bias.copy_(self.bias)
        return nn.Sequential(first, second)


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, new)


@dataclass
class _Layer:
    name: str
    module: FactorizedLinear
    weight: float  # positions per sample (MACs target) or 1 (params target)

    @property
    def dense_size(self) -> float:
        return self.weight * self.module.P.shape[0] * self.module.Q.shape[1]

    @property
    def component_size(self) -> float:
        return self.weight * (self.module.P.shape[0] + self.module.Q.shape[1])


def lagrangian_step_terms(
    s: torch.Tensor, t: float, lam1: torch.Tensor, lam2: torch.Tensor
) -> torch.Tensor:
    return lam1 * (s - t) + lam2 * (s - t) ** 2


class Flop:
    def __init__(self, params: FlopParams) -> None:
        self.params = params

    # -------------------------------------------------------------- setup

    def _positions(self, model: nn.Module, example: torch.Tensor) -> dict[str, float]:
        """Rows each Linear processes per sample (tokens for [B, T, D] activations)."""
        rows: dict[str, float] = {}
        hooks = []
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear):
                hooks.append(
                    mod.register_forward_hook(
                        lambda m, i, o, name=name: rows.__setitem__(
                            name, o.numel() / o.shape[0] / m.out_features
                        )
                    )
                )
        with torch.no_grad():
            model(example)
        for h in hooks:
            h.remove()
        return rows

    def factorize(self, ctx: PruneContext, model: nn.Module) -> list[_Layer]:
        with torch.no_grad():
            out = model(ctx.example)
        out_dim = out.shape[-1]
        rows = self._positions(model, ctx.example)
        layers: list[_Layer] = []
        for name, mod in list(model.named_modules()):
            if not isinstance(mod, nn.Linear) or name not in rows:
                continue
            if mod.out_features == out_dim and not self.params.include_head:
                continue
            if min(mod.in_features, mod.out_features) < 2:
                continue
            fact = FactorizedLinear(
                mod,
                getattr(self.params, "temperature", 1.0),
                getattr(self.params, "init_mean", 0.5),
            )
            _set_module(model, name, fact)
            weight = rows[name] if ctx.spec.target.kind == "flops" else 1.0
            layers.append(_Layer(name, fact, weight))
        if not layers:
            raise BudgetUnreachable(
                "this model has no Linear layer (other than its output) to factorise"
            )
        return layers

    def target_sparsity(self, ctx: PruneContext, layers: list[_Layer]) -> float:
        """t = 1 - (size left for the factorised layers) / (their dense size)."""
        target = ctx.spec.target
        if target.fraction is None or target.kind == "latency":
            raise BudgetUnreachable(
                "flop needs a flops or params target (target.layers and target.latency are for channel pruning)"
            )
        total = ctx.base_costs.macs if target.kind == "flops" else ctx.base_costs.params
        dense = sum(layer.dense_size for layer in layers)
        other = total - dense
        budget = target.fraction * total - other
        if budget <= 0:
            raise BudgetUnreachable(
                f"the Linear layers hold {dense / total:.1%} of the {'MACs' if target.kind == 'flops' else 'parameters'}; "
                f"even removing them entirely cannot keep only {target.fraction:.1%}"
            )
        return min(0.999, max(0.0, 1.0 - budget / dense))

    @staticmethod
    def expected_sparsity(layers: list[_Layer]) -> torch.Tensor:
        dense = sum(layer.dense_size for layer in layers)
        size = sum(layer.module.expected_l0().sum() * layer.component_size for layer in layers)
        return cast(torch.Tensor, 1.0 - size / dense)  # size is a tensor: layers is never empty

    # -------------------------------------------------------------- training

    def train_gates(
        self, ctx: PruneContext, model: nn.Module, layers: list[_Layer], t: float
    ) -> list[dict[str, float]]:
        p = self.params
        device = ctx.device
        model.to(device)
        gate_params = [layer.module.log_alpha for layer in layers]
        gate_ids = {id(g) for g in gate_params}
        weights = [w for w in model.parameters() if id(w) not in gate_ids and w.requires_grad]
        lam = torch.zeros(2, device=device, requires_grad=True)
        opt_w = torch.optim.Adam(weights, lr=p.lr)
        opt_g = torch.optim.Adam(gate_params, lr=p.gate_lr)
        opt_l = torch.optim.SGD([lam], lr=p.lambda_lr, maximize=True)  # plain gradient ascent on λ
        gen = torch.Generator().manual_seed(ctx.seed)
        torch.manual_seed(ctx.seed)
        bs = ctx.spec.recovery.method_batch
        steps_per_epoch = math.ceil(len(ctx.data.x_train) / bs)
        total = max(1, p.epochs * steps_per_epoch)
        warm = max(1, int(p.warmup_fraction * total))
        curve: list[dict[str, float]] = []

        def loss_of(batch: tuple[torch.Tensor, torch.Tensor], step: int):
            xb, yb = batch
            t_now = t * min(1.0, step / warm)
            ce = task_loss(model(xb), yb)
            s = self.expected_sparsity(layers)
            loss = ce + lagrangian_step_terms(s, t_now, lam[0], lam[1])
            return loss, {"loss": ce.item(), "sparsity": float(s.detach())}

        def on_step(epoch: int, step: int, _total: int, m: train.Metrics) -> None:
            ctx.progress(
                0.85 * step / total,
                f"L0 training epoch {epoch + 1}/{p.epochs}: expected sparsity {m['sparsity']:.3f} -> {t:.3f}",
            )

        def on_epoch(epoch: int, m: train.EpochMetrics) -> None:
            curve.append(
                {
                    "epoch": epoch + 1,
                    "loss": sum(m["loss"]) / len(m["loss"]),
                    "expected_sparsity": m["sparsity"][-1],
                    "target_sparsity": t,
                    "lambda1": float(lam[0]),
                    "lambda2": float(lam[1]),
                }
            )

        hooks = train.Hooks(on_step=on_step, on_epoch=on_epoch)
        batches = train.device_batches(ctx.data, bs, gen, device)
        run = train.Loop(batches, steps_per_epoch, loss_of, [opt_w, opt_g, opt_l], hooks=hooks)
        train.loop(model, run, p.epochs)
        return curve

    # -------------------------------------------------------------- selection and compilation

    @staticmethod
    def compile_model(
        model: nn.Module, layers: list[_Layer], keep: dict[str, torch.Tensor]
    ) -> nn.Module:
        import copy

        compiled = copy.deepcopy(model)
        for layer in layers:
            fact = cast(FactorizedLinear, compiled.get_submodule(layer.name))
            _set_module(compiled, layer.name, fact.compile(keep[layer.name]))
        return compiled.eval()

    @staticmethod
    def gate_scores(layers: list[_Layer]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            out = {}
            for layer in layers:
                layer.module.eval()
                out[layer.name] = layer.module.gates() + 1e-6 * torch.sigmoid(
                    layer.module.log_alpha
                )
            return out

    def select(
        self,
        ctx: PruneContext,
        model: nn.Module,
        layers: list[_Layer],
        scores: dict[str, torch.Tensor] | None = None,
    ) -> tuple[nn.Module, dict[str, int], float]:
        """Keep the globally highest-scored components (default: the largest gates);
        binary-search how many so the target is met on the compiled network."""
        target = ctx.spec.target
        fraction = target.fraction
        assert fraction is not None  # a flops or params target (checked by the budget)
        metric = (
            (lambda c: c.macs / ctx.base_costs.macs)
            if target.kind == "flops"
            else (lambda c: c.params / ctx.base_costs.params)
        )
        scores = scores if scores is not None else self.gate_scores(layers)
        ranked: list[tuple[float, str, int]] = []
        with torch.no_grad():
            for layer in layers:
                z = scores[layer.name]
                order = torch.argsort(z, descending=True, stable=True)
                # The first min_rank components of each layer are always kept.
                for pos, k in enumerate(order.tolist()):
                    score = float("inf") if pos < self.params.min_rank else float(z[k])
                    ranked.append((score, layer.name, k))
        ranked.sort(key=lambda r: -r[0])

        def build(n: int) -> tuple[nn.Module, dict[str, int], float]:
            keep: dict[str, list[int]] = {layer.name: [] for layer in layers}
            for _, name, k in ranked[:n]:
                keep[name].append(k)
            tensors = {k: torch.tensor(sorted(v), dtype=torch.long) for k, v in keep.items()}
            compiled = self.compile_model(model, layers, tensors)
            return compiled, {k: len(v) for k, v in keep.items()}, metric(ctx.costs(compiled))

        fixed = sum(1 for r in ranked if r[0] == float("inf"))
        lo, hi = fixed, len(ranked)
        cache: dict[int, tuple[nn.Module, dict[str, int], float]] = {}

        def kept(n: int) -> float:
            if n not in cache:
                cache[n] = build(n)
            return cache[n][2]

        if kept(lo) > fraction:
            raise BudgetUnreachable(
                f"keeping {self.params.min_rank} component(s) per factorised layer already keeps {kept(lo):.1%}; "
                "lower method.params.min_rank or raise the target"
            )
        # kept() is not monotone where a layer switches between factorised and dense form;
        # search the largest n still within the target, then take the closest neighbour.
        if kept(hi) <= fraction:
            lo = hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if kept(mid) <= fraction:
                lo = mid
            else:
                hi = mid
        best = min((n for n in (lo, hi) if n in cache), key=lambda n: abs(cache[n][2] - fraction))
        compiled, ranks, achieved = cache[best]
        return compiled, ranks, achieved

    # -------------------------------------------------------------- entry point

    def run(self, ctx: PruneContext) -> MethodResult:
        model = ctx.copy_model()
        layers = self.factorize(ctx, model)
        t = self.target_sparsity(ctx, layers)
        curve = self.train_gates(ctx, model, layers, t)
        model.cpu()
        compiled, ranks, achieved = self.select(ctx, model, layers)
        ctx.progress(1.0, f"compiled {len(layers)} factorised layers")
        full_ranks = {layer.name: layer.module.rank for layer in layers}
        return MethodResult(
            compiled,
            details={
                "target_sparsity": t,
                "final_expected_sparsity": curve[-1]["expected_sparsity"] if curve else None,
                "ranks": {k: {"kept": ranks[k], "full": full_ranks[k]} for k in ranks},
                "kept_fraction_torch_count": achieved,
                "curve": curve,
            },
        )
