"""channel_regression (He, Zhang, Sun 2017): LASSO channel selection + least-squares
reconstruction of the next layer.

For a group with c channels of which k are to be kept, and its consuming layer W
(n outputs), sample N positions (`samples`) of the consumer's output on calibration
images. Z_i = X_i W_iᵀ is channel i's contribution to the n outputs at those positions
(computed from the network pruned so far), Y the *unpruned* network's outputs there (bias
excluded) less the contributions of the consumer's inputs outside the group. Solve

    β = argmin 1/(2Nn) ||Y − Σ_i β_i Z_i||² + α ||β||₁

starting at α = `alpha0` and doubling α until at most k β's are non-zero, then binary-
searching α (in log space) between the last two values until exactly k are (the
authors' schedule);
the non-zero β's are the kept channels. Finally the consumer's weights on its remaining
inputs are refit by least squares, W' = argmin ||Y − X' W'ᵀ||², over every position of the
calibration images, so that it reproduces the unpruned output from the pruned input.

Y is scaled to unit RMS first so that α means the same in every layer. A group read by
several consumers (a residual stream) stacks their rows (each consumer at unit RMS),
selects one β, and reconstructs each consumer on its own. Groups are processed from the
input towards the output, so each layer's reconstruction also absorbs the error of the
layers pruned before it (He et al.'s whole-model setting). As for ThiNet, the engine's
uniform allocator fixes how many channels each group loses (the LASSO needs a k); the
scores it is given are the |β| of a first LASSO pass on the unpruned network.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import Lasso

from engine.graph import channel_scores
from engine.method import MethodResult, PruneContext
from methods.base.reconstruction import (
    MaskedModel,
    Patches,
    capture,
    consumers_of,
    cut_and_check,
    least_squares,
    processing_order,
    to_channels,
)
from methods.base.scoring import filter_l1
from methods.channel_regression import ChannelRegressionParams

MAX_SEARCH_STEPS = 40
MAX_LS_ROWS = 16384


@dataclass
class LassoSelection:
    keep: list[int]
    beta: np.ndarray
    alpha: float
    steps: int
    exact: bool


def _fit(z: np.ndarray, y: np.ndarray, alpha: float) -> np.ndarray:
    # Cold starts on purpose: a warm start from a sparser solution can stop within the
    # tolerance with coordinates still at zero, which makes the count non-monotone in α.
    # rows >> channels: coordinate descent on the precomputed Gram matrix is far cheaper.
    model = Lasso(alpha=alpha, fit_intercept=False, max_iter=10_000, tol=1e-6, precompute=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(z, y)
    return np.asarray(model.coef_, dtype=np.float64)


def lasso_select(z: np.ndarray, y: np.ndarray, k: int, alpha0: float = 1e-3) -> LassoSelection:
    """He et al.'s α search: z [rows, c] channel contributions, y [rows]; keep exactly k."""
    c = z.shape[1]
    if k >= c:
        return LassoSelection(list(range(c)), np.ones(c), 0.0, 0, True)
    nnz = lambda b: int(np.count_nonzero(np.abs(b) > 0))  # noqa: E731
    live = np.flatnonzero(np.abs(z).max(0) > 0)
    if len(live) <= k:
        # Channels that never contribute (dead units) get β = 0 at every α: keep every live
        # channel and fill up with dead ones, lowest index first.
        dead = [i for i in range(c) if i not in set(live.tolist())]
        keep = sorted(live.tolist() + dead[: k - len(live)])
        beta = np.zeros(c)
        beta[live] = 1.0
        return LassoSelection(keep, beta, 0.0, 0, True)
    steps = 0
    alpha = alpha0
    beta = _fit(z, y, alpha)
    steps += 1
    lo_alpha, lo_beta = None, None  # largest α seen with more than k non-zeros
    hi_alpha, hi_beta = None, None  # smallest α seen with at most k non-zeros
    if nnz(beta) > k:
        while nnz(beta) > k and steps < MAX_SEARCH_STEPS:
            lo_alpha, lo_beta = alpha, beta
            alpha *= 2.0
            beta = _fit(z, y, alpha)
            steps += 1
        hi_alpha, hi_beta = alpha, beta
    else:
        # α0 is already too strong: relax it until more than k survive.
        while nnz(beta) <= k and steps < MAX_SEARCH_STEPS and alpha > 1e-12:
            hi_alpha, hi_beta = alpha, beta
            alpha /= 2.0
            beta = _fit(z, y, alpha)
            steps += 1
        lo_alpha, lo_beta = alpha, beta
    if hi_beta is not None and nnz(hi_beta) == k:
        assert hi_alpha is not None  # set together with hi_beta
        return LassoSelection(
            sorted(np.flatnonzero(hi_beta).tolist()), hi_beta, hi_alpha, steps, True
        )
    while steps < MAX_SEARCH_STEPS and lo_alpha is not None and hi_alpha is not None:
        mid = math.sqrt(lo_alpha * hi_alpha)  # α spans decades: bisect in log space
        beta = _fit(z, y, mid)
        steps += 1
        n = nnz(beta)
        if n == k:
            return LassoSelection(sorted(np.flatnonzero(beta).tolist()), beta, mid, steps, True)
        if n > k:
            lo_alpha, lo_beta = mid, beta
        else:
            hi_alpha, hi_beta = mid, beta
    # Not exact within the step budget (ties): keep the k largest |β| of the denser solution.
    beta = lo_beta if lo_beta is not None else beta
    keep = sorted(np.argsort(-np.abs(beta), kind="stable")[:k].tolist())
    return LassoSelection(keep, beta, float(lo_alpha or alpha), steps, False)


class ChannelRegression:
    def __init__(self, params: ChannelRegressionParams) -> None:
        self.params = params

    def _problem(self, model, dg, group, images, targets, gen):
        """Stacked LASSO rows over the group's consumers, and per-consumer data for the
        reconstruction: (Z [rows, c], y [rows], [(consumer, patches, target outputs)])."""
        consumers, _ = consumers_of(model, dg, group)
        if not consumers:
            return None
        inputs = capture(model, [c.module for c in consumers], images)
        zs, ys, per = [], [], []
        n_cons = len(consumers)
        for c in consumers:
            patches = Patches(c.module, inputs[c.module])
            y_full = targets[c.name]  # unpruned output, [B, ...]
            b, length = patches.p.shape[0], patches.positions
            n = min(max(1, self.params.samples // n_cons), b * length)
            flat = torch.randperm(b * length, generator=gen)[:n]
            img, pos = flat // length, flat % length
            contrib = patches.feature_contributions(img, pos)  # [N, O, F]
            z, rest = to_channels(contrib, c.feature_root, group.channels)  # [N, O, C], [N, O]
            y = patches.output_at(img, pos, y_full) - patches.bias() - rest
            scale = float(y.pow(2).mean().sqrt()) or 1.0
            zs.append((z / scale).reshape(-1, group.channels))
            ys.append((y / scale).reshape(-1))
            per.append((c, patches, y_full))
        return torch.cat(zs).numpy(), torch.cat(ys).numpy(), per

    def _reconstruct(self, consumer, patches: Patches, y_full: torch.Tensor, gen) -> float:
        """Least-squares refit of the consumer's weights on its remaining input features;
        returns the relative error after the refit."""
        b, length = patches.p.shape[0], patches.positions
        flat = torch.randperm(b * length, generator=gen)[:MAX_LS_ROWS]
        img, pos = flat // length, flat % length
        x = patches.p[img, pos]  # [R, F, K]
        y = patches.output_at(img, pos, y_full) - patches.bias()  # [R, O]
        live = x.abs().flatten(1).amax(0).reshape(x.shape[1], x.shape[2]).amax(1) > 0  # [F]
        xf = x[:, live].reshape(len(img), -1)
        w = least_squares(xf, y)  # [live*K, O]
        new = torch.zeros_like(patches.w)
        new[:, live] = w.T.reshape(patches.w.shape[0], int(live.sum()), patches.w.shape[2])
        err = float((y - xf @ w).pow(2).mean() / y.pow(2).mean().clamp_min(1e-30))
        module = consumer.module
        with torch.no_grad():
            module.weight.copy_(new.reshape(module.weight.shape).to(module.weight.dtype))
        return err

    def run(self, ctx: PruneContext) -> MethodResult:
        p = self.params
        images = ctx.calibration[: p.calibration_images]
        gen = torch.Generator().manual_seed(ctx.seed)
        notes: list[str] = []
        dg = ctx.dependency_graph()
        all_consumers = {}
        for group in ctx.groups:
            for c in consumers_of(ctx.model, dg, group)[0]:
                all_consumers[c.name] = c.module
        by_module = capture(ctx.model, list(all_consumers.values()), images, outputs=True)
        targets = {name: by_module[m] for name, m in all_consumers.items()}

        # 1. A LASSO on the unpruned network scores the channels (|β| at the α where half
        #    survive); the engine's search turns the scores into per-group counts.
        scores: dict[str, torch.Tensor] = {}
        fallback: list[str] = []
        for i, group in enumerate(ctx.groups):
            problem = self._problem(ctx.model, dg, group, images, targets, gen)
            if problem is None:
                scores[group.name] = channel_scores(ctx.model, dg, group.name, filter_l1)
                fallback.append(group.name)
                continue
            z, y, _ = problem
            sel = lasso_select(z, y, max(1, group.channels // 2), p.alpha0)
            scores[group.name] = torch.as_tensor(np.abs(sel.beta), dtype=torch.float64)
            ctx.progress(
                0.3 * (i + 1) / len(ctx.groups), f"channel_regression: scored {group.name}"
            )
        if fallback:
            notes.append(
                f"channel_regression: no Conv/Linear consumer for {fallback}; those groups were ranked by filter L1 norm"
            )
        budget_model, plan, details = ctx.prune_to_budget(scores, p.allocation)
        counts = {k: len(v) for k, v in plan.items() if v}

        # 2. Layer by layer: LASSO selection for exactly k, then least-squares reconstruction.
        work = MaskedModel(ctx.model, ctx.example, ctx.dependency_graph)
        todo = [g for g in processing_order(work.model, ctx.groups) if counts.get(g.name)]
        record: dict[str, dict] = {}
        for i, group in enumerate(todo):
            if group.name in fallback:
                work.remove(group.name, plan[group.name])
                continue
            keep_n = group.channels - counts[group.name]
            z, y, per = self._problem(work.model, work.dg, group, images, targets, gen)
            sel = lasso_select(z, y, keep_n, p.alpha0)
            removed = sorted(set(range(group.channels)) - set(sel.keep))
            work.remove(group.name, removed)
            errs = []
            for consumer, _, y_full in per:
                # Re-read the consumer's input: removing the channels zeroed some of it.
                x_now = capture(work.model, [consumer.module], images)[consumer.module]
                errs.append(
                    self._reconstruct(consumer, Patches(consumer.module, x_now), y_full, gen)
                )
            # A consumer may also produce channels of a group removed earlier (a residual
            # stream): the refit must not bring those output channels back.
            work.rezero()
            record[group.name] = {
                "alpha": sel.alpha,
                "search_steps": sel.steps,
                "exact": sel.exact,
                "kept": len(sel.keep),
                "relative_error_after_reconstruction": float(np.mean(errs)),
            }
            ctx.progress(
                0.3 + 0.7 * (i + 1) / len(todo), f"channel_regression: pruned {group.name}"
            )

        pruned = cut_and_check(ctx, work, budget_model, "channel_regression")
        details["removed_channels"] = counts
        details["lasso"] = record
        details["fallback_groups"] = fallback
        return MethodResult(pruned, details=details, notes=notes)
