"""tas (Dong & Yang. Network Pruning via Transformable Architecture Search. NeurIPS 2019).

Every prunable group g gets a learnable distribution alpha_g over candidate widths
k_1 < ... < k_m (width_candidates x C). In each forward pass:

* two candidates are sampled from the Gumbel-softmax distribution
  softmax((log_softmax(alpha_g) + Gumbel) / tau), without replacement, and their weights are
  the softmax of their two perturbed logits (the renormalised probabilities);
* candidates share weights: candidate k uses the group's first k channels (in a sharing
  order fixed at the start: strongest L1 filter norm of the uploaded weights first);
* each candidate's output O[1:k] is aligned to the larger sampled width by channel-wise
  interpolation (CWI, adaptive average pooling over the channel axis), zero beyond it, and
  the two are mixed by their weights. One linear map over the group's channels does all of
  this, applied by forward hooks on every layer that produces the group's channels.

The expected FLOPs E[F] = F(E[k_g]) are exact and differentiable (`WidthCost`: every counted
layer is bilinear in its input and output widths, and the distributions are independent).
Weights (SGD) and distributions (Adam, lr 1e-3) are updated alternately on two halves of the
training data; the architecture loss is CE + flop_weight * L_flop with L_flop = log E[F] while
the argmax architecture is over budget, -log E[F] while it is under by more than
flop_tolerance, else 0. The argmax widths are then moved by the fewest channels needed to
meet the budget (reported), the searched weights of the kept channels are kept, and the
engine recovers the network with knowledge distillation from the uploaded model.
Depth search (the paper's optional part) is not done.
"""

from __future__ import annotations

import copy
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from engine import train
from engine.graph import channel_scores
from engine.method import MethodResult, PruneContext, widths_to_plan
from methods.base.scoring import filter_l1
from methods.base.widths import (
    ChannelSites,
    WidthCost,
    curves_png,
    group_step,
    round_width,
    widths_table,
)
from methods.tas import TASParams

MAX_LAYER_RATIO = 0.9  # as every method in the engine: keep >= 10% of each group


@functools.lru_cache(maxsize=4096)
def cwi_matrix(k: int, width: int) -> torch.Tensor:
    """[width, k]: channel-wise interpolation of k channels to `width` channels (adaptive
    average pooling over channels: output i averages inputs floor(i*k/w) .. ceil((i+1)*k/w)-1)."""
    m = torch.zeros(width, k)
    for i in range(width):
        s, e = (i * k) // width, -((-(i + 1) * k) // width)
        m[i, s:e] = 1.0 / (e - s)
    return m


def sample_two(
    alpha: torch.Tensor, tau: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two distinct candidates from the Gumbel-softmax distribution and their renormalised
    (differentiable) weights."""
    u = torch.rand(alpha.shape, generator=generator).clamp_(1e-10, 1.0 - 1e-10)
    logits = (F.log_softmax(alpha, dim=-1) + (-torch.log(-torch.log(u)))) / tau
    probs = F.softmax(logits, dim=-1).detach()
    idx = torch.multinomial(
        probs + 1e-7, min(2, alpha.numel()), replacement=False, generator=generator
    )
    return idx, F.softmax(logits[idx], dim=-1)


def flop_loss(
    expected: torch.Tensor, argmax_fraction: float, target: float, tolerance: float
) -> torch.Tensor:
    """The paper's piecewise FLOPs loss on the expected FLOPs (as a fraction of the original)."""
    if argmax_fraction > target:
        return torch.log(expected)
    if argmax_fraction < target * (1.0 - tolerance):
        return -torch.log(expected)
    return expected.new_zeros(())


class WidthSearch(nn.Module):
    """The searchable distributions of all groups and the channel maps they induce."""

    def __init__(
        self, groups, candidates: dict[str, list[int]], order: dict[str, torch.Tensor]
    ) -> None:
        super().__init__()
        self.names = [g.name for g in groups]
        self.channels = {g.name: g.channels for g in groups}
        self.candidates = candidates
        self.alphas = nn.ParameterList(
            [nn.Parameter(torch.zeros(len(candidates[n]))) for n in self.names]
        )
        # rank[r] = position of root channel r in the sharing order
        self.rank = {n: torch.argsort(order[n]) for n in self.names}
        self.order = order
        self.mode = "sample"  # "sample" | "argmax"
        self._maps: dict[str, torch.Tensor] = {}

    def alpha(self, name: str) -> torch.Tensor:
        return self.alphas[self.names.index(name)]

    def probs(self, name: str) -> torch.Tensor:
        return F.softmax(self.alpha(name), dim=-1)

    def expected_widths(self) -> dict[str, torch.Tensor]:
        return {
            n: (self.probs(n) * torch.tensor(self.candidates[n], dtype=torch.float32)).sum()
            for n in self.names
        }

    def argmax_widths(self) -> dict[str, int]:
        return {n: self.candidates[n][int(self.alpha(n).argmax())] for n in self.names}

    def _rank_to_root(self, name: str, m: torch.Tensor) -> torch.Tensor:
        r = self.rank[name]
        return m[r][:, r]

    def resample(self, tau: float, generator: torch.Generator | None = None) -> None:
        """Draw the two candidates of every group and build its channel map."""
        self._maps = {}
        for n in self.names:
            c, cands = self.channels[n], self.candidates[n]
            if self.mode == "argmax":
                k = cands[int(self.alpha(n).argmax())]
                m = torch.zeros(c, c)
                m[:k, :k] = torch.eye(k)
            else:
                idx, w = sample_two(self.alpha(n), tau, generator)
                ks = [cands[int(i)] for i in idx]
                width = max(ks)
                m = torch.zeros(c, c)
                for wj, k in zip(w, ks, strict=True):
                    block = torch.zeros(c, c)
                    block[:width, :k] = cwi_matrix(k, width)  # cached: never modified
                    m = m + wj * block
            self._maps[n] = self._rank_to_root(n, m)

    def channel_map(self, name: str) -> torch.Tensor:
        return self._maps[name]


def candidate_widths(channels: int, fractions: list[float], round_to: int) -> list[int]:
    keep_min = max(round_to, math.ceil(channels * (1.0 - MAX_LAYER_RATIO)))
    return sorted({max(keep_min, round_width(f * channels, channels, round_to)) for f in fractions})


def adjust_to_budget(
    cost: WidthCost,
    widths: dict[str, int],
    channels: dict[str, int],
    target: float,
    tolerance: float,
    round_to: int | dict[str, int],
) -> tuple[dict[str, int], int]:
    """Move the widths by the fewest channels so that cost.fraction lands within tolerance/2
    of the target (greedy: each step changes one group by its step — round_to, or a step
    per group — choosing the step that lands in the band, else the one that moves the cost
    most towards the target). Returns (widths, channels changed)."""
    widths = dict(widths)
    steps = (
        {n: max(1, round_to.get(n, 1)) for n in widths}
        if isinstance(round_to, dict)
        else {n: max(1, round_to) for n in widths}
    )
    band = tolerance / 2
    changed = 0
    for _ in range(sum(channels.values()) // min(steps.values(), default=1) + 1):
        f = float(cost.fraction(widths))
        if abs(f - target) <= band:
            break
        sign = -1 if f > target else 1
        best, best_key = None, None
        for n, w in widths.items():
            step = steps[n]
            keep_min = max(step, math.ceil(channels[n] * (1.0 - MAX_LAYER_RATIO)))
            nw = min(channels[n], w + sign * step) if sign > 0 else w - step
            if nw == w or nw < keep_min:
                continue
            nf = float(cost.fraction({**widths, n: nw}))
            key = (abs(nf - target) <= band, abs(nf - f))
            if best_key is None or key > best_key:
                best, best_key = (n, nw), key
        if best is None:
            break
        changed += abs(best[1] - widths[best[0]])
        widths[best[0]] = best[1]
    return widths, changed


class TAS:
    def __init__(self, params: TASParams) -> None:
        self.params = params

    def run(self, ctx: PruneContext) -> MethodResult:
        p = self.params
        target = ctx.spec.target
        net = ctx.copy_model()
        dg = ctx.dependency_graph(net)
        l1 = {g.name: channel_scores(net, dg, g.name, filter_l1) for g in ctx.groups}
        order = {n: torch.argsort(-s, stable=True) for n, s in l1.items()}  # strongest first
        cands = {
            g.name: candidate_widths(g.channels, p.width_candidates, group_step(g, ctx.round_to))
            for g in ctx.groups
        }
        search = WidthSearch(ctx.groups, cands, order)
        with torch.no_grad():  # break the ties of the uniform start (argmax) at random
            gen = torch.Generator().manual_seed(ctx.seed)
            for a in search.alphas:
                a.add_(1e-3 * torch.randn(a.shape, generator=gen))
        kind = target.kind if target.kind in ("flops", "params") else "flops"
        cost = WidthCost(net, dg, ctx.groups, ctx.base_costs, kind)
        goal = float(target.fraction) if target.fraction is not None else 0.5
        history = self._search(ctx, net, search, cost, goal)
        net.eval()

        searched = search.argmax_widths()
        # "score" = position in the sharing order: candidate k is exactly the first k channels
        scores = {n: -torch.argsort(order[n]).double() for n in order}
        notes: list[str] = []
        details: dict = {}
        if target.layers is not None or target.kind == "latency":  # latency: measured, not counted
            pruned, plan, details = ctx.prune_to_budget(scores, model=net)
            final = {g.name: g.channels - len(plan.get(g.name, [])) for g in ctx.groups}
        else:
            searched_f = float(cost.fraction(searched))
            final, changed = adjust_to_budget(
                cost,
                searched,
                search.channels,
                goal,
                target.tolerance,
                {g.name: group_step(g, ctx.round_to) for g in ctx.groups},
            )
            if changed:
                notes.append(
                    f"tas: the argmax widths keep {searched_f:.4f} of the {kind}; moved {changed} channels "
                    f"(the fewest found) to meet the target {goal}"
                )
            details["budget_adjustment"] = {
                "argmax_fraction": round(searched_f, 6),
                "adjusted_fraction": round(float(cost.fraction(final)), 6),
                "channels_changed": changed,
                "changes": {n: [searched[n], final[n]] for n in final if final[n] != searched[n]},
            }
            pruned = ctx.prune_plan(widths_to_plan(ctx.groups, scores, final), model=net)
        ctx.progress(0.95, "building the searched network")
        curves = {
            "loss": {
                "weights CE (half A)": history["weight_ce"],
                "arch CE (half B)": history["arch_ce"],
                "arch loss": history["arch_loss"],
            },
            "expected MACs": {
                "E[F] / F": history["expected_fraction"],
                "argmax F / F": history["argmax_fraction"],
            },
        }
        details.update(
            widths=[
                {**row, "searched": searched.get(row["group"], row["channels_before"])}
                for row in widths_table(ctx.groups, final)
            ],
            candidates=cands,
            distributions={
                n: [round(float(v), 4) for v in search.probs(n).detach()] for n in search.names
            },
            search_curves={k: [round(float(v), 6) for v in vals] for k, vals in history.items()},
            recovery_note="recovered with distillation from the uploaded model (spec's recovery mode)",
        )
        png = curves_png(
            f"TAS width search (flop_weight {p.flop_weight}, target {goal})", curves, target=goal
        )
        return MethodResult(
            copy.deepcopy(pruned),
            details=details,
            notes=notes,
            distill={"alpha": p.kd_alpha, "temperature": p.kd_temperature},
            artifacts={"search_curves.png": png},
        )

    def _search(
        self, ctx: PruneContext, net: nn.Module, search: WidthSearch, cost: WidthCost, goal: float
    ) -> dict:
        p = self.params
        data = ctx.data
        gen = torch.Generator().manual_seed(ctx.seed)
        torch.manual_seed(ctx.seed)
        perm = torch.randperm(len(data.x_train), generator=gen)
        half_a, half_b = perm[: len(perm) // 2], perm[len(perm) // 2 :]
        weights = [q for q in net.parameters() if q.requires_grad]
        w_opt = torch.optim.SGD(
            weights, lr=p.weight_lr, momentum=0.9, nesterov=True, weight_decay=5e-4
        )
        a_opt = torch.optim.Adam(
            search.parameters(), lr=p.arch_lr, betas=(0.5, 0.999), weight_decay=1e-3
        )
        bs = ctx.spec.recovery.method_batch
        steps = math.ceil(len(half_a) / bs)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(w_opt, T_max=p.search_epochs * steps)
        sites = ChannelSites(net, ctx.dependency_graph(net), ctx.groups)
        sites.attach(search.channel_map)
        history: dict[str, list[float]] = {
            k: []
            for k in (
                "weight_ce",
                "arch_ce",
                "arch_loss",
                "flop_loss",
                "expected_fraction",
                "argmax_fraction",
                "tau",
            )
        }
        keys = ("weight_ce", "arch_ce", "arch_loss", "flop_loss")
        state: dict = {}

        def batches(epoch: int):
            frac = epoch / max(p.search_epochs - 1, 1)
            state["tau"] = p.tau_start - (p.tau_start - p.tau_end) * frac
            state["sums"] = dict.fromkeys(keys, 0.0)
            ia = half_a[torch.randperm(len(half_a), generator=gen)]
            ib = half_b[torch.randperm(len(half_b), generator=gen)]
            for s in range(steps):
                a, b = ia[s * bs : (s + 1) * bs], ib[s * bs : (s + 1) * bs]
                yield data.x_train[a], data.y_train[a], data.x_train[b], data.y_train[b]

        def weight_loss(batch, _step: int):
            """Weights: CE on half A with the distributions fixed."""
            xa, ya, xb, yb = batch
            with torch.no_grad():
                search.resample(state["tau"], gen)
            loss_w = train.task_loss(net(xa), ya)
            state["batch"] = (xb, yb, loss_w)
            return loss_w, {}

        def architecture_step() -> None:
            """Architecture: CE + flop_weight * L_flop on half B with the weights fixed."""
            xb, yb, loss_w = state["batch"]
            if len(xb) == 0:
                return
            search.resample(state["tau"], gen)
            ce = train.task_loss(net(xb), yb)
            expected = cost.fraction(search.expected_widths())
            argmax = float(cost.fraction(search.argmax_widths()))
            lf = flop_loss(expected, argmax, goal, p.flop_tolerance)
            loss_a = ce + p.flop_weight * lf
            a_opt.zero_grad(set_to_none=True)
            w_opt.zero_grad(set_to_none=True)
            loss_a.backward()
            a_opt.step()
            for k, v in zip(keys, (loss_w, ce, loss_a, lf), strict=True):
                state["sums"][k] += float(v.detach())

        def on_epoch(epoch: int, _m: train.EpochMetrics) -> None:
            for k, v in state["sums"].items():
                history[k].append(v / steps)
            with torch.no_grad():
                history["expected_fraction"].append(float(cost.fraction(search.expected_widths())))
                history["argmax_fraction"].append(float(cost.fraction(search.argmax_widths())))
            history["tau"].append(state["tau"])
            ctx.progress(
                0.9 * (epoch + 1) / p.search_epochs,
                f"search epoch {epoch + 1}/{p.search_epochs}: E[F] {history['expected_fraction'][-1]:.3f}, "
                f"argmax {history['argmax_fraction'][-1]:.3f}",
            )

        hooks = train.Hooks(after_step=architecture_step, on_epoch=on_epoch)
        run = train.Loop(batches, steps, weight_loss, [w_opt], [sched], hooks)
        try:
            train.loop(net, run, p.search_epochs)
        finally:
            sites.detach()
        return history
