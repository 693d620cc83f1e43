"""Shared machinery of the reconstruction methods (ThiNet, channel regression).

Both prune a group's channels by their effect on the layers that *consume* them (the
group members whose input channels go), measured on calibration images:

* `consumers_of` lists those layers and maps each of their input features to the group's
  root channel (a flatten maps one channel to several features, a concat to an offset);
* `capture` runs a model and keeps the consumers' inputs (and outputs);
* `Patches` turns a consumer's input into per-position patches, so that the contribution of
  input channel c to output o at position p is sum_k W[o, c, k] * P[p, c, k];
* `MaskedModel` is the full-size working copy the methods prune *layer by layer*: removed
  channels are zeroed (which the analysis proved equivalent to removing them), consumer
  weights are rewritten in place, and only at the end is the network cut structurally.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from core.errors import EngineError
from engine.channels import group_layers
from engine.graph import ChannelGroup, full_group, zero_out_channels

CONSUMER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)


def is_supported_consumer(module: nn.Module) -> bool:
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return module.groups == 1 and module.padding_mode == "zeros"
    return isinstance(module, nn.Linear)


@dataclass
class Consumer:
    name: str
    module: nn.Module
    # feature_root[f] = the group's root channel feeding input feature f, or -1.
    feature_root: torch.Tensor

    @property
    def in_group(self) -> torch.Tensor:
        return self.feature_root >= 0


def consumers_of(model: nn.Module, dg, group: ChannelGroup) -> tuple[list[Consumer], list[str]]:
    """The group's supported consuming layers, and the names of unsupported ones."""
    names = {m: n for n, m in model.named_modules()}
    layers = group_layers(dg, full_group(model, dg, group.name), names)
    out_modules = {lc.module for lc in layers if lc.role == "out"}
    maps: dict[str, Consumer] = {}
    skipped: list[str] = []
    for lc in layers:
        target, name = lc.module, lc.name
        if lc.role == "out" or name is None or target in out_modules:
            continue
        if not hasattr(target, "weight"):
            continue
        if not is_supported_consumer(target):
            if name not in skipped:
                skipped.append(name)
            continue
        if name not in maps:
            width = (
                target.in_features
                if isinstance(target, nn.Linear)
                else cast(int, target.in_channels)
            )
            maps[name] = Consumer(name, target, torch.full((width,), -1, dtype=torch.long))
        idxs = torch.as_tensor(lc.idxs, dtype=torch.long)
        maps[name].feature_root[idxs] = torch.as_tensor(lc.roots, dtype=torch.long)
    return list(maps.values()), skipped


@torch.no_grad()
def capture(
    model: nn.Module,
    modules: Sequence[nn.Module],
    x: torch.Tensor,
    outputs: bool = False,
    batch: int = 128,
) -> dict[nn.Module, torch.Tensor]:
    """Inputs (or outputs) of `modules` over `x`, concatenated along the batch."""
    store: dict[nn.Module, list[torch.Tensor]] = {m: [] for m in modules}

    def hook(m: nn.Module, inp, out) -> None:
        store[m].append((out if outputs else inp[0]).detach().cpu())

    handles = [m.register_forward_hook(hook) for m in modules]
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(x), batch):
            model(x[i : i + batch].to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {m: torch.cat(v) for m, v in store.items()}


class Patches:
    """A consumer's input as patches [B, L, F, K] (L positions per image, F input features,
    K kernel taps) and its weights as [O, F, K]: output[b, o, p] = sum_fk W[o,f,k] P[b,p,f,k] + bias."""

    def __init__(self, module: nn.Module, x: torch.Tensor) -> None:
        self.module = module
        x = x.double()
        if isinstance(module, nn.Linear):
            b = x.shape[0]
            self.p = x.reshape(b, -1, 1, module.in_features).transpose(2, 3)  # [B, L, F, 1]
            self.w = module.weight.detach().double().cpu().unsqueeze(-1)
            return
        conv = cast(nn.Conv1d | nn.Conv2d, module)  # is_supported_consumer
        if isinstance(conv.padding, str):  # "same"/"valid" stay strings, also on Conv1d
            raise EngineError(
                f"convolution {type(module).__name__} with padding={conv.padding!r} is not supported as a consuming layer"
            )
        kernel: tuple[int, ...]
        dil: tuple[int, ...]
        pad: tuple[int, ...]
        stride: tuple[int, ...]
        if isinstance(conv, nn.Conv1d):
            x = x.unsqueeze(2)
            kernel, dil, pad, stride = (
                (1, conv.kernel_size[0]),
                (1, conv.dilation[0]),
                (0, conv.padding[0]),
                (1, conv.stride[0]),
            )
        else:
            kernel, dil, pad, stride = (
                conv.kernel_size,
                conv.dilation,
                conv.padding,
                conv.stride,
            )
        cols = F.unfold(x, kernel, dilation=dil, padding=pad, stride=stride)  # [B, F*K, L]
        b, fk, length = cols.shape
        f = x.shape[1]
        self.p = cols.reshape(b, f, fk // f, length).permute(0, 3, 1, 2)  # [B, L, F, K]
        self.w = conv.weight.detach().double().cpu().reshape(conv.weight.shape[0], f, -1)

    @property
    def positions(self) -> int:
        return self.p.shape[1]

    def bias(self) -> torch.Tensor:
        b = getattr(self.module, "bias", None)
        return (
            b.detach().double().cpu()
            if b is not None
            else torch.zeros(self.w.shape[0], dtype=torch.float64)
        )

    def feature_contributions(
        self, img: torch.Tensor, pos: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-feature contributions at sampled (image, position[, output]): [N, F] when `out`
        (one output channel per sample, ThiNet) else [N, O, F] (all outputs, He et al.)."""
        patches = self.p[img, pos]  # [N, F, K]
        if out is not None:
            return (patches * self.w[out]).sum(-1)
        return torch.einsum("nfk,ofk->nof", patches, self.w)

    def output_at(self, img: torch.Tensor, pos: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The consumer's recorded output y ([B, O, ...] conv or [B, ..., O] linear) at
        (image, position): [N, O]."""
        o = self.w.shape[0]
        if isinstance(self.module, nn.Linear):
            flat = y.double().reshape(y.shape[0], -1, o)
        else:
            flat = y.double().reshape(y.shape[0], o, -1).transpose(1, 2)
        return flat[img, pos]


def to_channels(
    contrib: torch.Tensor, feature_root: torch.Tensor, channels: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum feature contributions (last dim) into the group's root channels; also return the
    summed contribution of the features outside the group."""
    inside = feature_root >= 0
    z = torch.zeros(*contrib.shape[:-1], channels, dtype=contrib.dtype)
    z.index_add_(contrib.dim() - 1, feature_root[inside], contrib[..., inside])
    return z, contrib[..., ~inside].sum(-1)


def sample_positions(
    batch: int, positions: int, per_image: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    img = torch.arange(batch).repeat_interleave(per_image)
    pos = torch.randint(positions, (batch * per_image,), generator=gen)
    return img, pos


def processing_order(model: nn.Module, groups: Sequence[ChannelGroup]) -> list[ChannelGroup]:
    """Groups from the input towards the output (by their first producing layer)."""
    if isinstance(model, fx.GraphModule):
        order = {str(n.target): i for i, n in enumerate(model.graph.nodes) if n.op == "call_module"}
    else:
        order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    big = len(order) + 1
    return sorted(
        groups,
        key=lambda g: min([order.get(m, big) for m in g.out_layers] or [order.get(g.name, big)]),
    )


def scale_input_features(module: nn.Module, feature_scale: torch.Tensor) -> None:
    """Multiply the weights reading input feature f by feature_scale[f]."""
    with torch.no_grad():
        w = module.weight
        assert isinstance(w, torch.Tensor)
        shape = [1, -1] + [1] * (w.dim() - 2)
        w.mul_(feature_scale.to(w.dtype).to(w.device).view(shape))


class MaskedModel:
    """A full-size working copy pruned by zeroing: `remove(group, idxs)` zeroes what removing
    those channels removes, and `plan` is what a structural prune must then cut."""

    def __init__(self, model: nn.Module, example: torch.Tensor, dependency_graph) -> None:
        self.model = copy.deepcopy(model)
        self.dg = dependency_graph(self.model)
        self.plan: dict[str, list[int]] = {}

    def remove(self, group: str, idxs: Sequence[int]) -> None:
        idxs = sorted(set(int(i) for i in idxs))
        self.plan[group] = idxs
        self.rezero(group)

    def rezero(self, group: str | None = None) -> None:
        for name in [group] if group is not None else list(self.plan):
            idxs = self.plan.get(name) or []
            if idxs:
                zero_out_channels(self.dg, full_group(self.model, self.dg, name, idxs))


def least_squares(x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-8) -> torch.Tensor:
    """argmin_w ||y - x w||^2 (+ a tiny ridge, relative to x's scale, for rank deficiency)."""
    x, y = x.double(), y.double()
    gram = x.T @ x
    lam = ridge * (float(gram.diagonal().mean()) if gram.numel() else 0.0) + 1e-12
    gram = gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(gram, x.T @ y)


def cut_and_check(ctx, work: MaskedModel, budget_model: nn.Module, method: str) -> nn.Module:
    """Cut the zeroed channels structurally and check the widths equal the budget search's:
    the layer-by-layer choice of channels must not change how many each group loses."""
    pruned = ctx.prune_plan(work.plan, model=work.model)
    got, want = ctx.costs(pruned), ctx.costs(budget_model)
    if (got.macs, got.params) != (want.macs, want.params):
        raise EngineError(
            f"{method}: the layer-by-layer prune has {got.macs} MACs / {got.params} parameters but the "
            f"budget search found {want.macs} / {want.params}; the widths must not depend on the channels chosen"
        )
    return pruned.cpu().eval()
