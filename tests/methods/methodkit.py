"""Helpers for the method tests: tiny exported models and a PruneContext built the way the
pipeline builds one (load the ONNX, convert, analyse)."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from torch import nn

import zoo
from prunery.spec import JobSpec
from workers.engine import graph, load, train
from workers.engine.flops import torch_costs
from workers.engine.method import PruneContext


def tiny_convnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    ).eval()


def export(model: nn.Module, path: Path) -> Path:
    buf = io.BytesIO()
    torch.onnx.export(model.eval(), (torch.randn(2, 1, 8, 8),), buf, dynamo=False, opset_version=17,
                      input_names=["input"], dynamic_axes={"input": {0: "batch"}})
    path.write_bytes(buf.getvalue())
    return path


def make_ctx(onnx_path: Path, method: str, target: dict, params: dict | None = None, train_n: int = 256,
             recovery: dict | None = None) -> PruneContext:
    """The pipeline's prune-stage context on the digits data (a subset, for speed)."""
    d = zoo.digits_arrays()
    data = train.TensorData(
        torch.from_numpy(d["x_train"][:train_n]), torch.from_numpy(d["y_train"][:train_n]),
        torch.from_numpy(d["x_test"]), torch.from_numpy(d["y_test"]),
    )
    loaded = load.load(Path(onnx_path), (1, 8, 8))
    example = data.x_train[:1].clone()
    calibration = data.x_train[:256]
    analysis = graph.analyse(loaded.module, example, calibration[:16])
    spec = JobSpec(method={"name": method, "params": params or {}}, target=target, recovery=recovery or {"epochs": 1})
    return PruneContext(
        spec=spec, model=loaded.module, example=example, calibration=calibration, data=data,
        analysis=analysis, base_costs=torch_costs(loaded.module, example), device=torch.device("cpu"),
        seed=0, progress=lambda f, m: None,
    )
