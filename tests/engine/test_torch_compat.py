"""The export path must not depend on torch's private exporter globals (issue 9: on some
torch releases `torch.onnx.symbolic_helper` has neither `GLOBALS` nor
`_export_onnx_opset_version`, and onnx2torch's Gather/Squeeze/Reduce modules read them)."""

from __future__ import annotations

import io
import types

import onnx
import pytest
import torch
from onnx2torch.node_converters.gather import OnnxGather
from onnx2torch.node_converters.reduce import OnnxReduceStaticAxes

from engine.export import export_onnx
from engine.load import ort_session


class _Head(torch.nn.Module):
    """onnx2torch modules that ask for the opset while exporting: Gather and ReduceMean."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = OnnxReduceStaticAxes(operation_type="ReduceMean", axes=[2, 3], keepdims=0)
        self.pick = OnnxGather(axis=1)
        self.register_buffer("idx", torch.tensor([2, 0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pick(self.pool(x), self.idx)


@pytest.fixture
def torch_without_private_globals(monkeypatch):
    import onnx2torch.utils.common as common

    monkeypatch.setattr(common, "symbolic_helper", types.SimpleNamespace())


def test_plain_export_breaks_without_the_private_globals(torch_without_private_globals):
    # The premise: onnx2torch itself fails when torch does not carry those attributes.
    with pytest.raises(AttributeError):
        torch.onnx.export(
            _Head(), (torch.rand(2, 3, 4, 4),), io.BytesIO(), dynamo=False, opset_version=17
        )


@pytest.mark.parametrize("opset", [13, 17])
def test_engine_export_needs_no_private_torch_api(torch_without_private_globals, opset):
    x = torch.rand(3, 3, 4, 4)
    model = export_onnx(_Head(), x[:1], opset)
    onnx.checker.check_model(model)
    assert model.opset_import[0].version == opset
    got = ort_session(model.SerializeToString()).run(None, {"input": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), _Head()(x), rtol=1e-5, atol=1e-6)
