"""Torchvision CNNs for the coverage tests and benchmark: random init, exported with either
exporter, plus a random image dataset (no downloads; nothing is trained).

`reduced(name)` builds a narrow, shallow variant with torchvision's own builders (the same
block types: grouped convs, channel shuffle, layer scale, SE, depthwise), so the test tier
stays fast on 2 cores; `full(name)` is the torchvision model itself (benchmarks/coverage.py).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import onnx
import torch
import torchvision
from torch import nn
from torchvision import models as tvm

NUM_CLASSES = 10


def reduced(name: str) -> nn.Module:
    """A small model of the same family as torchvision's `name` (random init)."""
    torch.manual_seed(0)
    if name == "shufflenet_v2_x0_5":
        return tvm.ShuffleNetV2([2, 2, 2], [24, 48, 96, 192, 256], num_classes=NUM_CLASSES)
    if name == "regnet_x_400mf":
        params = tvm.regnet.BlockParams.from_init_params(
            depth=6, w_0=16, w_a=12.0, w_m=2.0, group_width=8
        )
        return tvm.RegNet(params, num_classes=NUM_CLASSES)
    if name == "convnext_tiny":
        cfg = tvm.convnext.CNBlockConfig
        setting = [cfg(16, 32, 1), cfg(32, 64, 1), cfg(64, None, 1)]
        return tvm.ConvNeXt(
            setting, stochastic_depth_prob=0.0, layer_scale=0.5, num_classes=NUM_CLASSES
        )
    if name == "resnext50_32x4d":
        return tvm.ResNet(
            tvm.resnet.Bottleneck,
            [1, 1, 1, 1],
            groups=8,
            width_per_group=4,
            num_classes=NUM_CLASSES,
        )
    if name == "mobilenet_v3_small":
        return tvm.mobilenet_v3_small(width_mult=0.5, num_classes=NUM_CLASSES)
    if name == "efficientnet_b0":
        setting, last = tvm.efficientnet._efficientnet_conf(
            "efficientnet_b0", width_mult=0.5, depth_mult=0.34
        )
        norm = partial(nn.BatchNorm2d, eps=1e-3)
        return tvm.EfficientNet(
            setting, 0.2, last_channel=last, num_classes=NUM_CLASSES, norm_layer=norm
        )
    raise KeyError(name)


REDUCED = (
    "shufflenet_v2_x0_5",
    "regnet_x_400mf",
    "convnext_tiny",
    "resnext50_32x4d",
    "mobilenet_v3_small",
    "efficientnet_b0",
)


def full(name: str) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None, num_classes=NUM_CLASSES)


def _randomise_norms(model: nn.Module) -> None:
    """Give BatchNorm/LayerNorm non-trivial statistics and affines, so folded exports are not
    degenerate (fresh BN is the identity) and zero-equivalence is actually exercised."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


def export(model: nn.Module, path: Path, size: int, dynamo: bool) -> Path:
    """ONNX with a dynamic batch: the TorchScript exporter (opset 17) or the dynamo exporter."""
    model.eval()
    _randomise_norms(model)
    x = torch.randn(2, 3, size, size)
    tmp = path.with_suffix(".tmp.onnx")
    if dynamo:
        batch = torch.export.Dim("batch", min=1, max=4096)
        torch.onnx.export(model, (x,), str(tmp), dynamic_shapes=({0: batch},), verbose=False)
    else:
        torch.onnx.export(
            model,
            (x,),
            str(tmp),
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    m = onnx.load(str(tmp))
    onnx.save(m, str(path), save_as_external_data=False)
    for p in tmp.parent.glob(tmp.name + "*"):
        p.unlink()
    return path


def image_npz(path: Path, size: int, train: int = 64, test: int = 32) -> Path:
    rng = np.random.default_rng(0)
    np.savez(
        path,
        x_train=rng.standard_normal((train, 3, size, size)).astype(np.float32),
        y_train=rng.integers(0, NUM_CLASSES, train).astype(np.int64),
        x_test=rng.standard_normal((test, 3, size, size)).astype(np.float32),
        y_test=rng.integers(0, NUM_CLASSES, test).astype(np.int64),
    )
    return path


# Reasons that must never appear for these models: the structures this kit exists to cover.
STRUCTURAL = (
    "groups=",
    "grouped convolution",
    "shuffle",
    "does not settle",
    "must match",
    "Reshape",
    "does not exist",
)
