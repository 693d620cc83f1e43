"""Shared machinery of the methods that learn widths (pruning_from_scratch, tas).

* `ChannelSites`: where each prunable group's channels leave a layer. The uploaded ONNX has
  its BatchNorm folded into the convs, so a per-channel gate is applied by a forward hook
  on every Conv/Linear whose output channels belong to the group (a residual group's
  coupled convs all get the same gate), mapped through Torch-Pruning's `idxs`/`root_idxs`.
  A hook multiplies by a per-root-channel vector (PFS gates) or applies a root-channel
  mixing matrix (TAS: truncation + channel-wise interpolation + mixing).
* `WidthCost`: the MACs (or parameters) of the network as a differentiable function of the
  groups' widths. Every counted layer is a Conv/Linear whose cost is bilinear in its kept
  input and output fractions (depthwise convs: linear in the output), so with integer widths
  it equals the count of the structurally pruned network; with expected widths it is TAS's
  expected FLOPs (independent layers: E[in·out] = E[in]·E[out]). A layer that reads a
  group's channels as rows (an MLP-Mixer's token MLP, after an axis swap) also scales
  with that group's kept fraction.
* `curves_png`: the search-curve plot both methods attach as an artifact.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from engine.channels import channel_dim, gate_output, layer_maps
from engine.flops import Costs
from engine.graph import PRUNABLE_ROOTS, ChannelGroup

ChannelMap = Callable[[str], torch.Tensor]
"""group name -> a [C] scale vector or a [C, C] root-channel mixing matrix."""


@dataclass
class _Site:
    group: str
    idxs: torch.Tensor  # the layer's output-channel positions
    roots: torch.Tensor  # the group's root channel of each position


class ChannelSites:
    """Per-group channel gates applied by forward hooks on the layers that produce them."""

    def __init__(self, model: nn.Module, dg, groups: Sequence[ChannelGroup]) -> None:
        self.model = model
        self.groups = list(groups)
        self.sites: dict[nn.Module, list[_Site]] = {}
        for g in self.groups:
            for role, cmap in layer_maps(model, dg, g.name):
                if role == "out":
                    module = model.get_submodule(cmap.module)
                    self.sites.setdefault(module, []).append(_Site(g.name, cmap.idxs, cmap.roots))
        self._handles: list = []

    def attach(self, channel_map: ChannelMap) -> None:
        """A [C] scale per group goes through the engine's gate hook; a [C, C] mixing
        matrix (TAS) through a hook of its own."""
        self.detach()
        for module, sites in self.sites.items():
            self._handles.append(
                gate_output(module, self._scale(sites, channel_map, channel_dim(module)))
            )
            self._handles.append(module.register_forward_hook(self._mix(sites, channel_map)))

    @staticmethod
    def _scale(sites: list[_Site], channel_map: ChannelMap, dim: int):
        def gate(out: torch.Tensor) -> torch.Tensor | None:
            factor = None
            for s in sites:
                g = channel_map(s.group)
                if g.dim() != 1:
                    return None
                g = g.to(out.device)
                if factor is None:
                    factor = torch.ones(out.shape[dim], device=out.device, dtype=g.dtype)
                idxs = s.idxs.to(out.device)
                new = factor.index_select(0, idxs) * g[s.roots.to(out.device)]
                factor = factor.index_copy(0, idxs, new)
            return factor

        return gate

    @staticmethod
    def _mix(sites: list[_Site], channel_map: ChannelMap):
        def hook(m: nn.Module, inputs, out: torch.Tensor) -> torch.Tensor:
            dim = channel_dim(m) % out.dim()
            for s in sites:
                g = channel_map(s.group)
                if g.dim() == 1:
                    return out
                g = g.to(out.device)
                idxs = s.idxs.to(out.device)
                roots = s.roots.to(out.device)
                part = out.index_select(dim, idxs)
                sub = g[roots][:, roots]  # [n, n] among this layer's channels
                new = torch.movedim(torch.movedim(part, dim, -1) @ sub.t(), -1, dim)
                out = out.index_copy(dim, idxs, new)
            return out

        return hook

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


# ------------------------------------------------------------------ cost as a function of widths


@dataclass
class _LayerCost:
    name: str
    bilinear: float  # cost at full width, scaling with in_frac * out_frac (or out_frac, depthwise)
    linear: float  # cost scaling with out_frac only (biases, for parameters)
    depthwise: bool
    out_full: int
    in_full: int
    out_terms: list[tuple[str, int]] = field(default_factory=list)  # (group, channels of it here)
    in_terms: list[tuple[str, int]] = field(default_factory=list)
    # Groups whose channels are rows of this layer's input, not its features (an MLP-Mixer's
    # token MLP after an axis swap sees the residual width as rows): (group, channels, width).
    row_terms: list[tuple[str, int, int]] = field(default_factory=list)


def _row_layers(model: nn.Module, dg, root: str) -> list[tuple[str, int, int]]:
    """(layer, channels of the group, full width) for every Conv/Linear that reads the
    group's channels as rows: the layers after an `AxisSwap` whose input is in the group,
    up to the next swap (engine/axis_swap.py)."""
    from engine.axis_swap import AxisSwap
    from engine.channels import group_layers
    from engine.graph import full_group

    names = {m: n for n, m in model.named_modules()}
    found: list[tuple[str, int, int]] = []
    for lc in group_layers(dg, full_group(model, dg, root), names):
        if not isinstance(lc.module, AxisSwap) or lc.role != "in":
            continue
        frontier, seen = list(dg.module2node[lc.module].outputs), set[int]()
        while frontier and len(seen) < 256:
            node = frontier.pop()
            if id(node) in seen or isinstance(node.module, AxisSwap):
                continue
            seen.add(id(node))
            name = names.get(node.module) if isinstance(node.module, nn.Module) else None
            if name is not None and isinstance(node.module, PRUNABLE_ROOTS):
                found.append((name, len(set(lc.idxs)), lc.module.in_width))
            frontier.extend(node.outputs)
    return found


class WidthCost:
    """Exact MACs/params of the network as a function of group widths (see module doc)."""

    def __init__(
        self,
        model: nn.Module,
        dg,
        groups: Sequence[ChannelGroup],
        base: Costs,
        metric: str = "flops",
    ) -> None:
        self.metric = metric
        self.channels = {g.name: g.channels for g in groups}
        self.base_total = float(base.macs if metric == "flops" else base.params)
        layers: dict[str, _LayerCost] = {}
        for name, mod in model.named_modules():
            if not isinstance(mod, PRUNABLE_ROOTS):
                continue
            if isinstance(mod, nn.Linear):
                out_full, in_full, dw = mod.out_features, mod.in_features, False
            else:
                out_full, in_full = mod.out_channels, mod.in_channels
                dw = mod.groups > 1 and mod.groups == mod.in_channels
            if metric == "flops":
                bil, lin = float(base.per_layer.get(name, 0)), 0.0
            else:
                bil = float(mod.weight.numel())
                lin = float(mod.bias.numel()) if mod.bias is not None else 0.0
            layers[name] = _LayerCost(name, bil, lin, dw, out_full, in_full)
        for g in groups:
            for role, cmap in layer_maps(model, dg, g.name):
                lc = layers.get(cmap.module)
                if lc is None:
                    continue
                (lc.out_terms if role == "out" else lc.in_terms).append((g.name, len(cmap.idxs)))
            for name, n, width in _row_layers(model, dg, g.name):
                if name in layers:
                    layers[name].row_terms.append((g.name, n, width))
        self.layers = [lc for lc in layers.values() if lc.out_terms or lc.in_terms or lc.row_terms]
        self.constant = self.base_total - sum(lc.bilinear + lc.linear for lc in self.layers)

    def __call__(self, widths: Mapping[str, torch.Tensor | float]) -> torch.Tensor:
        """Cost for widths {group: (expected) kept channels}; groups not named keep all."""

        def frac(full: int, terms: list[tuple[str, int]]) -> torch.Tensor | float:
            kept: torch.Tensor | float = float(full)
            for g, n in terms:
                if g in widths:
                    kept = kept - n * (1.0 - widths[g] / self.channels[g])
            return kept / full

        total: torch.Tensor | float = self.constant
        for lc in self.layers:
            fo = frac(lc.out_full, lc.out_terms)
            fi = 1.0 if lc.depthwise else frac(lc.in_full, lc.in_terms)
            total = total + lc.bilinear * fi * fo * self._rows(lc, widths) + lc.linear * fo
        return (
            torch.as_tensor(total, dtype=torch.float64)
            if not isinstance(total, torch.Tensor)
            else total
        )

    def _rows(
        self, lc: _LayerCost, widths: Mapping[str, torch.Tensor | float]
    ) -> torch.Tensor | float:
        """The kept fraction of the layer's rows (MACs only: weights do not depend on rows)."""
        factor: torch.Tensor | float = 1.0
        if self.metric != "flops":
            return factor
        for g, n, full in lc.row_terms:
            if g in widths:
                factor = factor * (full - n * (1.0 - widths[g] / self.channels[g])) / full
        return factor

    def fraction(self, widths: Mapping[str, torch.Tensor | float]) -> torch.Tensor:
        return self(widths) / self.base_total


def group_step(group: ChannelGroup, round_to: int) -> int:
    """The width step of a group: round_to, raised to a multiple of the group's quantum (a
    grouped conv's block, engine/grouped.py), so every width is reachable exactly."""
    q = max(1, group.quantum)
    return q * math.ceil(max(1, round_to) / q)


def round_width(k: float, channels: int, round_to: int) -> int:
    """A width in [round_to, channels] that is a multiple of round_to (or the full width)."""
    step = max(1, round_to)
    w = int(round(k / step)) * step
    return int(min(channels, max(step, w)))


def widths_table(groups: Sequence[ChannelGroup], widths: dict[str, int]) -> list[dict]:
    return [
        {
            "group": g.name,
            "channels_before": g.channels,
            "channels_after": int(widths.get(g.name, g.channels)),
            "kept": round(widths.get(g.name, g.channels) / g.channels, 4),
        }
        for g in groups
    ]


def curves_png(
    title: str, panels: dict[str, dict[str, Sequence[float]]], target: float | None = None
) -> bytes:
    """One panel per entry: {panel title: {series label: values per epoch}}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    for ax, (name, series) in zip(axes[0], panels.items(), strict=True):
        for label, values in series.items():
            ax.plot(range(1, len(values) + 1), values, marker="o", ms=3, label=label)
        if target is not None and ("FLOPs" in name or "MACs" in name):
            ax.axhline(target, color="grey", ls="--", lw=1, label="target")
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def finite(values: Sequence[float]) -> list[float]:
    return [round(float(v), 6) if math.isfinite(v) else None for v in values]  # type: ignore[misc]
