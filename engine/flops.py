"""Counting MACs and parameters, two independent ways.

* `onnx_costs`: on an ONNX graph — the numbers in the report. Every intermediate tensor's
  real shape comes from one onnxruntime run at batch 1 (no guessing from shape inference),
  then MACs are summed over Conv, ConvTranspose, Gemm and MatMul nodes (the convention of
  fvcore/thop and of torch's FlopCounterMode: multiply-accumulates of the dense ops;
  pooling, normalisation and element-wise ops are not counted). Parameters are the
  elements of floating-point initializers.
* `torch_costs`: on a torch module with torch.utils.flop_counter.FlopCounterMode (FLOPs/2)
  — used while searching for the budget and to cross-check the ONNX counter in tests.
  Per-layer MACs come from forward hooks on Conv/Linear modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

_FLOAT = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}


@dataclass
class Costs:
    macs: int
    params: int
    per_layer: dict[str, int] = field(default_factory=dict)


def onnx_param_count(model: onnx.ModelProto) -> int:
    total = 0
    for t in model.graph.initializer:
        if t.data_type in _FLOAT:
            total += int(np.prod(t.dims)) if len(t.dims) else 1
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.t.data_type in _FLOAT:
                    total += int(np.prod(a.t.dims)) if len(a.t.dims) else 1
    return total


def _all_shapes(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for node in probe.graph.node:
        for out in node.output:
            if out and out not in known:
                probe.graph.output.append(onnx.ValueInfoProto(name=out))
                known.add(out)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    values = sess.run(names, feed)
    shapes = {n: tuple(np.asarray(v).shape) for n, v in zip(names, values, strict=True)}
    for name, arr in feed.items():
        shapes[name] = tuple(arr.shape)
    for init in model.graph.initializer:
        shapes[init.name] = tuple(int(d) for d in init.dims)
    return shapes


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def onnx_costs(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> Costs:
    """MACs per sample (feed must have batch 1) and parameters of an ONNX graph."""
    shapes = _all_shapes(model, feed)
    per: dict[str, int] = {}
    total = 0
    for i, node in enumerate(model.graph.node):
        op = node.op_type
        macs = 0
        try:
            if op == "Conv":
                w = shapes[node.input[1]]
                out = shapes[node.output[0]]
                macs = int(np.prod(out)) * int(np.prod(w[1:]))
            elif op == "ConvTranspose":
                x = shapes[node.input[0]]
                w = shapes[node.input[1]]  # [Cin, Cout/g, k...]
                macs = int(np.prod(x)) * int(np.prod(w[1:]))
            elif op == "Gemm":
                a = shapes[node.input[0]]
                k = a[0] if _attr(node, "transA", 0) else a[-1]
                macs = int(np.prod(shapes[node.output[0]])) * int(k)
            elif op == "MatMul":
                a = shapes[node.input[0]]
                macs = int(np.prod(shapes[node.output[0]])) * int(a[-1])
        except KeyError:
            continue
        if macs:
            per[node.name or f"{op}_{i}"] = macs
            total += macs
    return Costs(macs=total, params=onnx_param_count(model), per_layer=per)


def _layer_macs(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        k = int(np.prod(module.kernel_size))
        return int(out.numel() // out.shape[0] * (module.in_channels // module.groups) * k)
    if isinstance(module, nn.Linear):
        return int(out.numel() // out.shape[0] * module.in_features)
    return 0


def torch_costs(model: nn.Module, example: torch.Tensor) -> Costs:
    """MACs per sample (example may have any batch) and parameters of a torch module."""
    per: dict[str, int] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):

            def hook(m, i, o, name=name):
                per[name] = per.get(name, 0) + _layer_macs(m, i[0], o)

            hooks.append(mod.register_forward_hook(hook))
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            model(example)
    finally:
        for h in hooks:
            h.remove()
    batch = example.shape[0] if example.dim() else 1
    macs = counter.get_total_flops() // 2 // batch
    params = sum(p.numel() for p in model.parameters())
    params += sum(b.numel() for b in model.buffers() if b.is_floating_point())
    return Costs(
        macs=int(macs), params=int(params), per_layer={k: v // batch for k, v in per.items()}
    )


def numpy_initializer(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    return None
