"""Converters the engine adds to or replaces in onnx2torch's registry (engine/converters.py),
proven on small hand-written ONNX graphs: the load step's parity check against
onnxruntime, and the re-exported graph run in onnxruntime again."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from engine import load
from engine.converters import OnnxClipTensorBounds
from engine.export import export_onnx


def _save(nodes: list, inits: list, in_dims: list, path: Path) -> Path:
    """A one-input ("input", float, `in_dims`) graph whose "output" is [N, 10], checked and saved."""
    graph = helper.make_graph(
        nodes,
        path.stem,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, in_dims)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def _model(clip_inputs: list[str], extra: list[onnx.NodeProto], path: Path) -> Path:
    """input [N,3,8,8] -> Conv 3->4 -> Clip(clip_inputs) -> GAP -> Flatten -> Gemm 4->10."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b"),
        numpy_helper.from_array(rng.standard_normal((10, 4)).astype(np.float32), "fw"),
        numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "fb"),
        numpy_helper.from_array(np.array(-0.25, dtype=np.float32), "lo"),
        numpy_helper.from_array(np.array(0.5, dtype=np.float32), "half"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        *extra,
        helper.make_node("Clip", ["c", *clip_inputs], ["k"]),
        helper.make_node("GlobalAveragePool", ["k"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["output"], transB=1),
    ]
    return _save(nodes, inits, ["N", 3, 8, 8], path)


def _round_trip(path: Path) -> tuple[load.LoadedModel, onnx.ModelProto]:
    loaded = load.load(path, (3, 8, 8))  # proves torch == onnxruntime on random inputs
    again = export_onnx(loaded.module, torch.randn(2, 3, 8, 8), loaded.opset)
    x = np.random.default_rng(1).standard_normal((4, 3, 8, 8)).astype(np.float32)
    want = load.ort_session(loaded.onnx_model).run(None, {"input": x})[0]
    got = load.ort_session(again).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    return loaded, again


def test_clip_with_an_omitted_bound_converts(tmp_path):
    """Swin V2's F.normalize exports Clip(x, eps, ""): onnx2torch looked the empty name up
    as a constant and refused the model ("Dynamic value of min/max is not implemented")."""
    _loaded, again = _round_trip(_model(["lo", ""], [], tmp_path / "min_only.onnx"))
    assert Counter(n.op_type for n in again.graph.node)["Clip"] == 1


def test_clip_with_bounds_computed_in_the_graph_converts(tmp_path):
    extra = [
        helper.make_node("ReduceMax", ["c"], ["m"], keepdims=0),
        helper.make_node("Mul", ["m", "half"], ["hi"]),
    ]
    loaded, again = _round_trip(_model(["", "hi"], extra, tmp_path / "computed_max.onnx"))
    assert any(isinstance(m, OnnxClipTensorBounds) for m in loaded.module.modules())
    assert Counter(n.op_type for n in again.graph.node)["Clip"] == 1


def test_constant_squeeze_and_split_convert_to_modules_torch_export_traces(tmp_path):
    """onnx2torch's Squeeze-13 and Split-13 read constant axes/sizes back from tensors with
    `.item()`, which torch.export cannot trace: a pruned ViT got no model.pt2 ("Could not
    extract specialized integer from data-dependent expression"). Constant ones become the
    static modules; the graph stays the same ops."""
    from onnx2torch.node_converters.split import OnnxSplit
    from onnx2torch.node_converters.squeeze import OnnxSqueezeStaticAxes

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((10, 16)).astype(np.float32), "fw"),
        numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "fb"),
        numpy_helper.from_array(np.array([3, 5], dtype=np.int64), "sizes"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"),
    ]
    nodes = [  # [N,1,2,8] -> squeeze(1) -> split(3,5 on the last axis) -> concat -> Gemm
        helper.make_node("Squeeze", ["input", "axes"], ["s"]),
        helper.make_node("Split", ["s", "sizes"], ["a", "b"], axis=2),
        helper.make_node("Concat", ["b", "a"], ["c"], axis=2),
        helper.make_node("Flatten", ["c"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["output"], transB=1),
    ]
    path = _save(nodes, inits, ["N", 1, 2, 8], tmp_path / "squeeze_split.onnx")
    loaded = load.load(path, (1, 2, 8))
    kinds = {type(m) for m in loaded.module.modules()}
    assert {OnnxSqueezeStaticAxes, OnnxSplit} <= kinds
    batch = torch.export.Dim("batch", min=1, max=1024)
    x = torch.randn(3, 1, 2, 8)
    program = torch.export.export(loaded.module.eval(), (x,), dynamic_shapes=({0: batch},))
    torch.testing.assert_close(program.module()(x[:1]), loaded.module(x[:1]))
    again = export_onnx(loaded.module, x, loaded.opset)
    assert Counter(n.op_type for n in again.graph.node) == Counter(
        n.op_type for n in loaded.onnx_model.graph.node
    )


def test_constant_slice_converts_to_a_static_module_torch_export_traces(tmp_path):
    """onnx2torch's Slice-10+ module reads constant starts/ends/axes/steps back with
    `.numpy()`, which torch.export cannot trace (a Swin got no model.pt2). Constant ones
    become `OnnxSliceStatic`: negative axes and starts, INT64_MIN / INT64_MAX bounds and a step of 2
    keep their meaning, and the re-export is one Slice again."""
    from engine.converters import OnnxSliceStatic

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((10, 72)).astype(np.float32), "fw"),
        numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "fb"),
        numpy_helper.from_array(np.array([-(2**63), -7], dtype=np.int64), "starts"),
        numpy_helper.from_array(np.array([2**63 - 1, 7], dtype=np.int64), "ends"),
        numpy_helper.from_array(np.array([-2, -1], dtype=np.int64), "axes"),
        numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "steps"),
    ]
    nodes = [  # [N,3,8,8] -> all rows, columns 1,3,5 -> [N,3,8,3] -> Flatten -> Gemm 72->10
        helper.make_node("Slice", ["input", "starts", "ends", "axes", "steps"], ["s"]),
        helper.make_node("Flatten", ["s"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["output"], transB=1),
    ]
    path = _save(nodes, inits, ["N", 3, 8, 8], tmp_path / "slice.onnx")
    loaded = load.load(path, (3, 8, 8))  # its parity check proves the slice against onnxruntime
    assert any(isinstance(m, OnnxSliceStatic) for m in loaded.module.modules())
    batch = torch.export.Dim("batch", min=1, max=1024)
    x = torch.randn(3, 3, 8, 8)
    program = torch.export.export(loaded.module.eval(), (x,), dynamic_shapes=({0: batch},))
    torch.testing.assert_close(program.module()(x[:1]), loaded.module(x[:1]))
    again = export_onnx(loaded.module, x[:1], loaded.opset)
    assert Counter(n.op_type for n in again.graph.node) == Counter(
        n.op_type for n in loaded.onnx_model.graph.node
    )
    ref = load.ort_session(str(path)).run(None, {"input": x.numpy()})[0]
    got = load.ort_session(again.SerializeToString()).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
