"""thinet (Luo, Wu, Lin 2017): prune a layer's channels by their effect on the next layer.

For every prunable group, sample `samples_per_image` random (output channel, position)
pairs of each consuming layer per calibration image. Each sample's output is a sum of one
term per input channel, x̂_c = sum_k W[o, c, k] * patch[c, k]; removing a set T of channels
changes the output by sum_{c in T} x̂_c. Greedily add to T the channel that adds the least
squared error, until the target count is removed; then rescale the consumer's kept input
channels by least squares, ŵ = argmin ||ŷ - X ŵ||² (ŷ: the layer's output before this
layer was pruned), so that it reconstructs its output. `reconstruction_target="original"`
(not ThiNet's; He et al.'s choice) fits ŵ to the *unpruned* network's output instead, so
the rescale also absorbs the error of the layers pruned before — which matters on densely
connected networks, where ThiNet's own target lets errors compound (see the benchmark).

Through the dependency graph: a residual or concat group is chosen as one set. A group
with several consumers (a residual stream read by several blocks) stacks the consumers'
samples, each consumer's rows divided by the RMS of its sampled outputs so that every
consumer weighs the same, i.e. the greedy step minimises the sum of the consumers'
relative errors; each consumer is then rescaled on its own samples.

The budget: the greedy order on the unpruned network is the score given to the engine's
uniform allocator (every group loses the same fraction, as ThiNet prunes each layer at
one compression rate), whose search fixes how many channels each group loses. The
channels themselves are then chosen layer by layer from the input towards the output on
the network pruned so far (optionally fine-tuned in between), as the paper does; MACs
depend only on the widths, so the budget found by the search is kept exactly.
"""

from __future__ import annotations

import torch

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
    sample_positions,
    scale_input_features,
    to_channels,
)
from methods.base.scoring import filter_l1
from methods.thinet import ThiNetParams


def greedy_removal(z: torch.Tensor, count: int) -> list[int]:
    """ThiNet's greedy selection: z[m, c] is channel c's contribution to sample m; return the
    `count` channels removed, in order, each one adding the least squared error
    ||sum_{c in T} z[:, c]||² to those removed before it."""
    z = z.double()
    channels = z.shape[1]
    remaining = list(range(channels))
    removed: list[int] = []
    current = torch.zeros(z.shape[0], dtype=torch.float64)
    for _ in range(min(count, channels)):
        candidates = current[:, None] + z[:, remaining]
        err = (candidates**2).sum(0)
        j = int(torch.argmin(err))
        removed.append(remaining.pop(j))
        current = candidates[:, j]
    return removed


def rescale_factors(x_kept: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """ThiNet's rescale: ŵ = (XᵀX)⁻¹Xᵀŷ over the kept channels' contributions."""
    return least_squares(x_kept, y.unsqueeze(1)).squeeze(1)


class _ConsumerSamples:
    """One consumer's sampled terms: z [m, C] (group channels), rest [m] (its other inputs)
    and y [m] (the full output, bias excluded)."""

    def __init__(
        self, consumer, patches: Patches, channels: int, per_image: int, gen: torch.Generator
    ) -> None:
        self.consumer = consumer
        img, pos = sample_positions(patches.p.shape[0], patches.positions, per_image, gen)
        out = torch.randint(patches.w.shape[0], (len(img),), generator=gen)
        self.patches, self.img, self.pos, self.out = patches, img, pos, out
        contrib = patches.feature_contributions(img, pos, out)  # [m, F]
        self.z, self.rest = to_channels(contrib, consumer.feature_root, channels)
        self.y = contrib.sum(-1)
        self.scale = float(self.y.pow(2).mean().sqrt()) or 1.0


class ThiNet:
    def __init__(self, params: ThiNetParams) -> None:
        self.params = params

    def _samples(self, model, dg, group, images, gen) -> tuple[list[_ConsumerSamples], list[str]]:
        consumers, skipped = consumers_of(model, dg, group)
        if not consumers:
            return [], skipped
        inputs = capture(model, [c.module for c in consumers], images)
        samples = [
            _ConsumerSamples(
                c,
                Patches(c.module, inputs[c.module]),
                group.channels,
                self.params.samples_per_image,
                gen,
            )
            for c in consumers
        ]
        return samples, skipped

    @staticmethod
    def _stacked(samples: list[_ConsumerSamples]) -> torch.Tensor:
        return torch.cat([s.z / s.scale for s in samples])

    def _score_groups(
        self, ctx: PruneContext, images: torch.Tensor, gen: torch.Generator
    ) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Each group's channels ranked by the greedy removal order on the unpruned network
        (filter L1 norms for the groups no Conv/Linear reads); the fallback groups."""
        dg = ctx.dependency_graph()
        scores: dict[str, torch.Tensor] = {}
        fallback: list[str] = []
        for i, group in enumerate(ctx.groups):
            samples, _ = self._samples(ctx.model, dg, group, images, gen)
            if samples:
                order = greedy_removal(self._stacked(samples), group.channels)
                rank = torch.empty(group.channels, dtype=torch.float64)
                rank[torch.as_tensor(order)] = torch.arange(group.channels, dtype=torch.float64)
                scores[group.name] = rank
            else:
                # No Conv/Linear reads these channels (e.g. only a grouped conv): nothing to
                # reconstruct, so fall back to filter norms for this group.
                scores[group.name] = channel_scores(ctx.model, dg, group.name, filter_l1)
                fallback.append(group.name)
            ctx.progress(0.3 * (i + 1) / len(ctx.groups), f"thinet: scored {group.name}")
        return scores, fallback

    @staticmethod
    def _apply_scales(
        samples: list[_ConsumerSamples],
        scales: list[torch.Tensor],
        kept: list[int],
        channels: int,
    ) -> None:
        """Fold each consumer's least-squares factors on the kept channels into its weights."""
        for s, w in zip(samples, scales, strict=True):
            per_channel = torch.ones(channels, dtype=torch.float64)
            per_channel[kept] = w
            fr = s.consumer.feature_root
            feature_scale = torch.ones(len(fr), dtype=torch.float64)
            feature_scale[fr >= 0] = per_channel[fr[fr >= 0]]
            scale_input_features(s.consumer.module, feature_scale)

    def run(self, ctx: PruneContext) -> MethodResult:
        p = self.params
        images = ctx.calibration[: p.calibration_images]
        gen = torch.Generator().manual_seed(ctx.seed)
        notes: list[str] = []

        # 1. The greedy order on the unpruned network scores the channels; the engine's
        #    search turns it into how many channels each group loses.
        scores, fallback = self._score_groups(ctx, images, gen)
        if fallback:
            notes.append(
                f"thinet: no Conv/Linear consumer to reconstruct for {fallback}; those groups were ranked by filter L1 norm"
            )
        budget_model, plan, details = ctx.prune_to_budget(scores, "uniform")
        counts = {k: len(v) for k, v in plan.items() if v}

        # 2. Layer by layer from the input: choose on the network pruned so far, rescale,
        #    optionally fine-tune.
        work = MaskedModel(ctx.model, ctx.example, ctx.dependency_graph)
        todo = [g for g in processing_order(work.model, ctx.groups) if counts.get(g.name)]
        errors: dict[str, dict[str, float]] = {}
        for i, group in enumerate(todo):
            k = counts[group.name]
            if group.name in fallback:
                work.remove(group.name, plan[group.name])
                continue
            samples, _ = self._samples(work.model, work.dg, group, images, gen)
            removed = greedy_removal(self._stacked(samples), k)
            kept = sorted(set(range(group.channels)) - set(removed))
            before, after = 0.0, 0.0
            scales = []
            if p.reconstruction_target == "original":
                originals = capture(
                    ctx.model,
                    [ctx.model.get_submodule(s.consumer.name) for s in samples],
                    images,
                    outputs=True,
                )
            for s in samples:
                if p.reconstruction_target == "original":
                    # The unpruned network's output at the same samples, less the bias and
                    # the consumer's inputs outside the group (He et al.'s target).
                    y0 = originals[ctx.model.get_submodule(s.consumer.name)]
                    full = s.patches.output_at(s.img, s.pos, y0) - s.patches.bias()
                    target = full[torch.arange(len(s.out)), s.out] - s.rest
                else:
                    target = s.y - s.rest  # the group's share of the output before pruning
                plain = target - s.z[:, kept].sum(1)
                before += float(plain.pow(2).mean()) / s.scale**2
                if p.rescale:
                    w = rescale_factors(s.z[:, kept], target)
                    after += float((target - s.z[:, kept] @ w).pow(2).mean()) / s.scale**2
                    scales.append(w)
            work.remove(group.name, removed)
            if p.rescale:
                self._apply_scales(samples, scales, kept, group.channels)
            errors[group.name] = {"relative_error": before / len(samples)}
            if p.rescale:
                errors[group.name]["relative_error_rescaled"] = after / len(samples)
            if p.finetune_between_layers:
                ctx.train(
                    work.model, p.finetune_between_layers, after_step=lambda _m: work.rezero()
                )
                work.model.cpu().eval()
            ctx.progress(
                0.3 + 0.7 * (i + 1) / len(todo), f"thinet: pruned {group.name} ({k} channels)"
            )

        pruned = cut_and_check(ctx, work, budget_model, "thinet")
        details["removed_channels"] = counts
        details["reconstruction"] = errors
        details["fallback_groups"] = fallback
        return MethodResult(pruned, details=details, notes=notes)
