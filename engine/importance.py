"""Channel importance: one score per root channel of a prunable group (scoring kept apart
from surgery, as in Torch-Pruning).

* `magnitude` — filter L1 (Li et al. 2017) of every layer the group cuts. Each layer's scores
  are normalised *before* the group reduction (`normalizer`, e.g. divided by that layer's
  mean), so in a group that couples several layers (a residual chain, a concat) the layer
  with the largest weights does not decide the cut alone. Torch-Pruning's
  `GroupMagnitudeImportance` provides the per-layer statistics, the normalisers and the
  reductions; it normalises *after* the reduction, which cannot undo one layer dominating
  the sum, hence the subclass below.
* `taylor` — first-order Taylor expansion of the loss (Molchanov et al., CVPR 2019,
  "Importance Estimation for Neural Network Pruning"): a channel's importance is
  (sum over the parameters it removes of g·w)², computed per mini-batch of labelled
  training data and averaged. It estimates the change of the loss when the channel's output
  is zeroed, so it is comparable across layers without normalisation.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import torch
import torch_pruning as tp
from torch import nn

from engine import graph

Normalizer = Literal["none", "mean", "max", "sum"]
Reduction = Literal["sum", "mean", "max", "first"]

_OUT_FNS = (
    tp.pruner.function.prune_conv_out_channels,
    tp.pruner.function.prune_linear_out_channels,
)


class LayerNormalisedMagnitude(tp.importance.GroupMagnitudeImportance):
    """Torch-Pruning's group magnitude importance with each layer's scores normalised
    before they are reduced over the group (its own `normalizer` acts after the reduction)."""

    def __init__(
        self,
        p: int = 1,
        layer_normalizer: Normalizer = "mean",
        group_reduction: Reduction = "sum",
        inputs: bool = False,
    ) -> None:
        super().__init__(
            p=p,
            group_reduction=group_reduction,
            normalizer=None,
            bias=False,
            target_types=[nn.modules.conv._ConvNd, nn.Linear],
        )
        self.layer_normalizer = None if layer_normalizer == "none" else layer_normalizer
        self.inputs = inputs

    def _reduce(self, group_imp: list[torch.Tensor], group_idxs: list[list[int]]):
        normalised = [
            self._normalize(imp.double().clamp_min(0) + 0.0, self.layer_normalizer)
            for imp in group_imp
        ]
        normalised = [torch.nan_to_num(n, nan=0.0, posinf=0.0) for n in normalised]
        return super()._reduce(normalised, group_idxs)

    def __call__(self, group):
        items = list(group) if self.inputs else [it for it in group if it.dep.handler in _OUT_FNS]
        # tp's __call__ reads `group[i].root_idxs`, which a list of its items provides.
        return super().__call__(items)


def _row_l1(module: nn.Module) -> torch.Tensor | None:
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
        return module.weight.detach().abs().flatten(1).sum(1)
    return None


def magnitude(
    model: nn.Module,
    dg: tp.DependencyGraph,
    groups: Iterable[graph.ChannelGroup],
    normalizer: Normalizer = "mean",
    group_reduction: Reduction = "sum",
    inputs: bool = False,
) -> dict[str, torch.Tensor]:
    """Group L1 importance of every group, in its root's channel order (float64, CPU)."""
    from engine import heads

    scorer = LayerNormalisedMagnitude(
        p=1, layer_normalizer=normalizer, group_reduction=group_reduction, inputs=inputs
    )
    out: dict[str, torch.Tensor] = {}
    for g in groups:
        if heads.is_head_group(g.name):  # whole attention heads: the L1 of their q, k, v rows
            out[g.name] = heads.head_scores(model, g.name, _row_l1).double().cpu()
            continue
        group = graph.full_group(model, dg, g.name)
        score = scorer(group)
        if score is None or len(score) != g.channels:
            score = torch.zeros(g.channels)
        out[g.name] = score.detach().double().cpu()
    return out


def _out_members(
    model: nn.Module, dg: tp.DependencyGraph, root: str
) -> list[tuple[nn.Module, torch.Tensor, torch.Tensor]]:
    members = []
    for item in graph.full_group(model, dg, root):
        target = item.dep.target.module
        if item.dep.handler in _OUT_FNS and isinstance(target, nn.Module):
            members.append(
                (
                    target,
                    torch.as_tensor(list(item.idxs), dtype=torch.long),
                    torch.as_tensor(list(item.root_idxs), dtype=torch.long),
                )
            )
    return members


def taylor(
    model: nn.Module,
    example: torch.Tensor,
    groups: Sequence[graph.ChannelGroup],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    loss_fn,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """First-order Taylor importance (Molchanov et al. 2019) of every group's root channels,
    averaged over `batches` of (inputs, labels). The model is not modified (a copy is used)."""
    import copy

    m = copy.deepcopy(model).cpu()
    dg = graph.build_dependency_graph(m, example)
    members = {g.name: _out_members(m, dg, g.name) for g in groups}
    m.to(device).eval()  # eval: scores of the network as it is used (BN/Dropout inference)
    for p in m.parameters():
        p.requires_grad_(True)
    totals = {g.name: torch.zeros(g.channels, dtype=torch.float64) for g in groups}
    n = 0
    for xb, yb in batches:
        m.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = loss_fn(m(xb.to(device)), yb.to(device))
            loss.backward()
        n += 1
        for g in groups:
            per_batch = torch.zeros(g.channels, dtype=torch.float64)
            for module, idxs, roots in members[g.name]:
                w = module.weight  # conv/linear (_OUT_FNS): always a Parameter
                assert isinstance(w, torch.Tensor)
                gw = w.grad
                if gw is None:
                    continue
                contrib = (w.detach() * gw).flatten(1).sum(1)
                bias = getattr(module, "bias", None)
                if isinstance(bias, torch.Tensor) and bias.grad is not None:
                    contrib = contrib + bias.detach() * bias.grad
                per_batch.index_add_(0, roots, contrib.detach().double().cpu()[idxs])
            totals[g.name] += per_batch.pow(2)
    if n == 0:
        raise ValueError("taylor importance needs at least one labelled batch")
    return {k: v / n for k, v in totals.items()}
