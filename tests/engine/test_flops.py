"""MACs and parameters: a hand-computed net, and the ONNX counter against torch's."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import zoo
from engine.flops import onnx_costs, torch_costs


def _export(model: nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    buf = io.BytesIO()
    torch.onnx.export(
        model.eval(),
        (x,),
        buf,
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        dynamic_axes={"input": {0: "batch"}},
    )
    return onnx.load_from_string(buf.getvalue())


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)  # 8x8 out
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)  # depthwise
        self.conv2 = nn.Conv2d(8, 16, 1, stride=2)  # 4x4 out
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = self.conv2(self.dw(x))
        return self.fc(torch.flatten(x, 1))


def test_hand_computed_macs_and_params():
    model, x = Tiny(), torch.randn(1, 3, 8, 8)
    expected_macs = (
        8 * 8 * 8 * (3 * 3 * 3)  # conv1: out elements x (Cin x k x k)
        + 8 * 8 * 8 * (1 * 3 * 3)  # depthwise: out elements x (1 x k x k)
        + 16 * 4 * 4 * (8 * 1 * 1)  # conv2
        + 10 * 256  # fc
    )
    expected_params = (8 * 27 + 8) + (8 * 9 + 8) + (16 * 8 + 16) + (10 * 256 + 10)
    costs = onnx_costs(_export(model, x), {"input": x.numpy()})
    assert costs.macs == expected_macs == 13_824 + 4_608 + 2_048 + 2_560
    assert costs.params == expected_params
    tc = torch_costs(model, x)
    assert tc.macs == expected_macs and tc.params == expected_params
    assert tc.per_layer == {"conv1": 13_824, "dw": 4_608, "conv2": 2_048, "fc": 2_560}


def test_matmul_between_activations_is_counted():
    class Att(nn.Module):
        def forward(self, x):  # [B, T, D] @ [B, D, T] -> [B, T, T]
            return x @ x.transpose(1, 2)

    x = torch.randn(1, 5, 7)
    assert onnx_costs(_export(Att(), x), {"input": x.numpy()}).macs == 5 * 5 * 7
    assert torch_costs(Att(), x).macs == 5 * 5 * 7


@pytest.mark.slow
@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_onnx_counter_agrees_with_torch_flop_counter(zoo_model, name):
    """Second, independent counter: torch.utils.flop_counter on the torch model."""
    torch.manual_seed(0)
    model = zoo.ZOO[name]().eval()
    x = torch.randn(1, 1, 8, 8)
    proto = _export(model, x)
    onnx_macs = onnx_costs(proto, {"input": x.numpy()}).macs
    assert onnx_macs == torch_costs(model, x).macs
    assert onnx_macs > 0 and np.isfinite(onnx_macs)
