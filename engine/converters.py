"""Extensions to onnx2torch's converter registry for opsets it does not know yet.

onnx2torch 1.5.15 stops at opset 17-ish; torch.onnx.export's current default writes opset
18+ (ReduceMean-18 with axes as an input, Reshape-19/21 with allowzero, AveragePool-19,
Gelu-20 ...). `onnx.version_converter` cannot bring those graphs down (it has no adapter
for Gelu and leaves ReduceMean-18 attributes it then rejects), so we teach onnx2torch
the new versions through its public `add_converter` hook instead of forking it:

* ops whose newer versions only widened the type list are aliased to the newest converter
  onnx2torch has (the load step's torch-vs-onnxruntime parity check catches any drift);
* ops whose semantics moved get a converter of their own here.
"""

from __future__ import annotations

from typing import Any

import torch
from onnx import defs
from onnx2torch.node_converters import registry
from onnx2torch.node_converters.clip import OnnxClip
from onnx2torch.node_converters.reduce import OnnxReduceStaticAxes
from onnx2torch.node_converters.registry import OperationDescription, add_converter
from onnx2torch.node_converters.reshape import OnnxReshape
from onnx2torch.node_converters.split import OnnxSplit
from onnx2torch.node_converters.squeeze import OnnxSqueezeStaticAxes
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import (
    OnnxMapping,
    OperationConverterResult,
    get_const_value,
    onnx_mapping_from_node,
)
from onnx2torch.utils.custom_export_to_onnx import DefaultExportToOnnx
from torch import nn

_REDUCE_OPS = (
    "ReduceMean",
    "ReduceMax",
    "ReduceMin",
    "ReduceProd",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceSumSquare",
)
# Ops that semantically changed at these versions and get a converter below.
_SPECIAL = (
    {("Reshape", v) for v in (19, 21, 23, 24, 25)}
    | {(op, 18) for op in _REDUCE_OPS}
    | {
        ("Gelu", 20),
        ("AveragePool", 19),
        ("Split", 18),
    }
)


class OnnxReshapeAllowZero(OnnxReshape):
    """Reshape with allowzero=1: a 0 in the shape means an empty dimension, not 'copy'."""

    def forward(self, input_tensor: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        def _forward() -> torch.Tensor:
            return torch.reshape(input_tensor, torch.Size([int(s) for s in shape]))

        if torch.onnx.is_in_onnx_export():
            return DefaultExportToOnnx.export(
                _forward, "Reshape", input_tensor, shape, {"allowzero_i": 1}
            )
        return _forward()


def _reshape(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    allow_zero = node.attributes.get("allowzero", 0) == 1
    if allow_zero:
        # With no 0 in a constant shape, allowzero changes nothing: use the plain module
        # (exports as a plain Reshape, which every runtime and opset accepts).
        try:
            shape = get_const_value(node.input_values[1], graph)
            if not bool(torch.any(torch.as_tensor(shape) == 0)):
                allow_zero = False
        except KeyError:
            pass
    module = OnnxReshapeAllowZero() if allow_zero else OnnxReshape()
    return OperationConverterResult(torch_module=module, onnx_mapping=onnx_mapping_from_node(node))


def _reduce18(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    keepdims = node.attributes.get("keepdims", 1)
    noop = node.attributes.get("noop_with_empty_axes", 0)
    axes = None
    if len(node.input_values) > 1 and node.input_values[1]:
        try:
            axes = [
                int(a)
                for a in torch.as_tensor(get_const_value(node.input_values[1], graph)).tolist()
            ]
        except KeyError:
            raise NotImplementedError(f"{node.operation_type}-18 with non-constant axes") from None
    if not axes and noop:
        return OperationConverterResult(
            torch_module=nn.Identity(),
            onnx_mapping=OnnxMapping(inputs=(node.input_values[0],), outputs=node.output_values),
        )
    return OperationConverterResult(
        torch_module=OnnxReduceStaticAxes(
            operation_type=node.operation_type, axes=axes or None, keepdims=keepdims
        ),
        onnx_mapping=OnnxMapping(inputs=(node.input_values[0],), outputs=node.output_values),
    )


def _gelu(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    approximate = node.attributes.get("approximate", "none")
    if isinstance(approximate, bytes):
        approximate = approximate.decode()
    return OperationConverterResult(
        torch_module=nn.GELU(approximate=approximate), onnx_mapping=onnx_mapping_from_node(node)
    )


def _average_pool19(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    dilations = node.attributes.get("dilations")
    if dilations and any(int(d) != 1 for d in dilations):
        raise NotImplementedError("AveragePool-19 with dilations != 1")
    return registry._CONVERTER_REGISTRY[OperationDescription("", "AveragePool", 11)](node, graph)


class _SplitEqual(nn.Module):
    def __init__(self, axis: int, parts: int) -> None:
        super().__init__()
        self.axis, self.parts = axis, parts

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        size = x.shape[self.axis]
        chunk = -(-size // self.parts)  # ceil, as ONNX specifies for num_outputs
        return tuple(torch.split(x, chunk, dim=self.axis))


def _split18(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    if len(node.input_values) > 1 and node.input_values[1]:
        return registry._CONVERTER_REGISTRY[OperationDescription("", "Split", 13)](node, graph)
    axis = node.attributes.get("axis", 0)
    parts = node.attributes.get("num_outputs", len(node.output_values))
    return OperationConverterResult(
        torch_module=_SplitEqual(axis, parts),
        onnx_mapping=OnnxMapping(inputs=(node.input_values[0],), outputs=node.output_values),
    )


class OnnxHardSigmoidOp(nn.Module):
    """HardSigmoid that exports as one HardSigmoid node. onnx2torch's module computes
    clip(alpha * x + beta, 0, 1), which the exporter writes as Mul, Add and Clip: in
    MobileNetV3's squeeze-excite blocks onnxruntime then ran that Add at the cost of the
    whole excite multiply, and the pruned network came out 1.42x at batch 32 against 1.92x
    with the same widths exported as HardSigmoid."""

    def __init__(self, alpha: float = 0.2, beta: float = 0.5) -> None:
        super().__init__()
        self.alpha, self.beta = float(alpha), float(beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def _forward() -> torch.Tensor:
            return torch.clip(x * self.alpha + self.beta, min=0.0, max=1.0)

        if torch.onnx.is_in_onnx_export():
            return DefaultExportToOnnx.export(
                _forward, "HardSigmoid", x, {"alpha_f": self.alpha, "beta_f": self.beta}
            )
        return _forward()


def _hard_sigmoid(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    return OperationConverterResult(
        torch_module=OnnxHardSigmoidOp(
            alpha=node.attributes.get("alpha", 0.2), beta=node.attributes.get("beta", 0.5)
        ),
        onnx_mapping=onnx_mapping_from_node(node),
    )


class OnnxClipTensorBounds(nn.Module):
    """Clip whose bounds are computed in the graph (not constants): torch.clamp with tensors."""

    def __init__(self, has_min: bool, has_max: bool) -> None:
        super().__init__()
        self.has_min, self.has_max = has_min, has_max

    def forward(self, x: torch.Tensor, *bounds: torch.Tensor) -> torch.Tensor:
        it = iter(bounds)
        lo = next(it) if self.has_min else None
        hi = next(it) if self.has_max else None

        def _forward() -> torch.Tensor:
            return torch.clamp(x, lo, hi)

        if torch.onnx.is_in_onnx_export():
            # An omitted bound cannot be passed as None (the exporter crashes): +-inf.
            inf = torch.tensor(float("inf"), dtype=x.dtype)
            lo_t = lo if lo is not None else -inf
            hi_t = hi if hi is not None else inf
            return DefaultExportToOnnx.export(_forward, "Clip", x, lo_t, hi_t, {})
        return _forward()


def _clip11(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    """Clip-11+ whose optional min or max is omitted with an empty input name (Swin V2's
    F.normalize writes Clip(x, eps, "")): onnx2torch looked the empty name up as a constant
    and refused the model ("Dynamic value of min/max is not implemented")."""
    names = [*node.input_values[1:3], "", ""][:2]
    values: list[float | None] = []
    dynamic: list[str] = []
    for name in names:
        if not name:
            values.append(None)
            continue
        try:
            values.append(float(get_const_value(name, graph)))
        except KeyError:
            values.append(None)
            dynamic.append(name)
    if dynamic:
        return OperationConverterResult(
            torch_module=OnnxClipTensorBounds(bool(names[0]), bool(names[1])),
            onnx_mapping=OnnxMapping(
                inputs=(node.input_values[0], *[n for n in names if n]),
                outputs=node.output_values,
            ),
        )
    lo, hi = values
    module: nn.Module
    if lo is None and hi is None:
        module = nn.Identity()
    elif lo == 0 and hi is None:
        module = nn.ReLU()
    elif lo == 0 and hi == 6:
        module = nn.ReLU6()
    else:
        module = OnnxClip(min_val=lo, max_val=hi)
    return OperationConverterResult(
        torch_module=module,
        onnx_mapping=OnnxMapping(inputs=(node.input_values[0],), outputs=node.output_values),
    )


def _constant_ints(node: OnnxNode, graph: OnnxGraph, k: int) -> list[int] | None:
    """Input k of `node` as a list of ints when it is a constant (else None)."""
    if len(node.input_values) <= k or not node.input_values[k]:
        return None
    try:
        return [
            int(v) for v in torch.as_tensor(get_const_value(node.input_values[k], graph)).tolist()
        ]
    except KeyError:
        return None


def _squeeze13(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    """Squeeze-13+ with constant axes as the static-axes module: onnx2torch's dynamic one
    sorts the axes tensor and reads it back with `.item()`, which torch.export cannot trace
    (a pruned ViT got no model.pt2: "Could not extract specialized integer from
    data-dependent expression")."""
    axes = _constant_ints(node, graph, 1)
    if axes is None:
        return _ORIGINAL["Squeeze13"](node, graph)
    return OperationConverterResult(
        torch_module=OnnxSqueezeStaticAxes(axes=axes),
        onnx_mapping=OnnxMapping(inputs=(node.input_values[0],), outputs=node.output_values),
    )


def _split13(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    """Split-13+ with constant sizes as the static-sizes module (the same `.item()` reads)."""
    sizes = _constant_ints(node, graph, 1)
    if sizes is None:
        return _ORIGINAL["Split13"](node, graph)
    return OperationConverterResult(
        torch_module=OnnxSplit(
            axis=node.attributes.get("axis", 0), split=sizes, num_splits=len(node.output_values)
        ),
        onnx_mapping=OnnxMapping(inputs=(node.input_values[0],), outputs=node.output_values),
    )


class OnnxSliceStatic(nn.Module):
    """Slice-10+ whose starts, ends, axes and steps are constants (positive steps), kept as
    python ints: onnx2torch's module reads them back from tensors with `.numpy()`, which
    torch.export cannot trace (a Swin got no model.pt2). Exports as one Slice node with the
    same constant inputs."""

    def __init__(self, starts: list[int], ends: list[int], axes: list[int], steps: list[int]):
        super().__init__()
        self.starts, self.ends = [int(v) for v in starts], [int(v) for v in ends]
        self.axes, self.steps = [int(v) for v in axes], [int(v) for v in steps]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def _forward() -> torch.Tensor:
            index: list[slice] = [slice(None)] * x.dim()
            for start, end, axis, step in zip(
                self.starts, self.ends, self.axes, self.steps, strict=True
            ):
                # INT64 extremes ("from the start", "to the end") as None: torch warns when
                # it truncates them
                index[axis % x.dim()] = slice(
                    None if start <= -(2**31) else start, None if end >= 2**31 else end, step
                )
            return x[tuple(index)]

        if torch.onnx.is_in_onnx_export():
            args = [
                torch.tensor(v, dtype=torch.int64)
                for v in (self.starts, self.ends, self.axes, self.steps)
            ]
            return DefaultExportToOnnx.export(_forward, "Slice", x, *args, {})
        return _forward()

    def extra_repr(self) -> str:
        return f"starts={self.starts}, ends={self.ends}, axes={self.axes}, steps={self.steps}"


def _slice10(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    """Slice-10+ with constant inputs as `OnnxSliceStatic`; otherwise onnx2torch's module."""
    starts, ends = _constant_ints(node, graph, 1), _constant_ints(node, graph, 2)
    if starts is None or ends is None or len(starts) != len(ends):
        return _ORIGINAL["Slice"](node, graph)
    has_axes = len(node.input_values) > 3 and bool(node.input_values[3])
    has_steps = len(node.input_values) > 4 and bool(node.input_values[4])
    axes = _constant_ints(node, graph, 3) if has_axes else list(range(len(starts)))
    steps = _constant_ints(node, graph, 4) if has_steps else [1] * len(starts)
    if (
        axes is None
        or steps is None
        or len(axes) != len(starts)
        or len(steps) != len(starts)
        or any(s <= 0 for s in steps)
        or len({a for a in axes}) != len(axes)
        or (any(a < 0 for a in axes) and any(a >= 0 for a in axes))
    ):
        return _ORIGINAL["Slice"](node, graph)
    return OperationConverterResult(
        torch_module=OnnxSliceStatic(starts, ends, axes, steps),
        onnx_mapping=OnnxMapping(inputs=(node.input_values[0],), outputs=node.output_values),
    )


def _alias(target: OperationDescription):
    def convert(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
        return registry._CONVERTER_REGISTRY[target](node, graph)

    return convert


_installed = False
_ORIGINAL: dict[str, Any] = {}


def install() -> None:
    """Register the converters (idempotent)."""
    global _installed
    if _installed:
        return
    reg = registry._CONVERTER_REGISTRY
    max_opset = defs.onnx_opset_version()

    def add(op: str, version: int, fn) -> None:
        if OperationDescription("", op, version) not in reg:
            add_converter(operation_type=op, version=version)(fn)

    for v in (19, 21, 23, 24, 25):
        add("Reshape", v, _reshape)
    for op in _REDUCE_OPS:
        add(op, 18, _reduce18)
    add("Gelu", 20, _gelu)
    add("AveragePool", 19, _average_pool19)
    add("Split", 18, _split18)
    # Converters replaced, not only added: HardSigmoid exported as several nodes; Clip
    # refused an omitted bound.
    for v in (1, 6):
        reg[OperationDescription("", "HardSigmoid", v)] = _hard_sigmoid
    for v in (11, 12, 13):
        reg[OperationDescription("", "Clip", v)] = _clip11
    # Split/Squeeze with constant sizes/axes: static modules (their dynamic forms cannot be
    # traced by torch.export); the originals still convert the non-constant case.
    _ORIGINAL["Split13"] = reg[OperationDescription("", "Split", 13)]
    _ORIGINAL["Squeeze13"] = reg[OperationDescription("", "Squeeze", 13)]
    reg[OperationDescription("", "Split", 13)] = _split13
    _ORIGINAL["Slice"] = reg[OperationDescription("", "Slice", 13)]
    for v in (10, 11, 13):
        reg[OperationDescription("", "Slice", v)] = _slice10
    for v in (13, 21):
        reg[OperationDescription("", "Squeeze", v)] = _squeeze13

    # Type-only revisions: alias each missing since_version to the newest converter we have.
    known_ops = {d.operation_type for d in reg if d.domain == ""}
    for op in sorted(known_ops):
        versions = sorted(d.version for d in reg if d.domain == "" and d.operation_type == op)
        for opset in range(versions[-1] + 1, max_opset + 1):
            try:
                since = defs.get_schema(op, max_inclusive_version=opset).since_version
            except Exception:
                continue
            desc = OperationDescription("", op, since)
            if desc in reg or (op, since) in _SPECIAL:
                continue
            older = [v for v in versions if v < since]
            if older:
                add(op, since, _alias(OperationDescription("", op, older[-1])))
    _installed = True
