"""Helpers for the method tests: tiny exported models and a PruneContext built by the
pipeline's own `engine.prepare.prepare` (load the ONNX, convert, analyse)."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

import zoo
from engine.method import PruneContext
from engine.prepare import prepare
from methods import registry
from prunery.spec import JobSpec


def tiny_convnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    ).eval()


def export(model: nn.Module, path: Path) -> Path:
    buf = io.BytesIO()
    torch.onnx.export(
        model.eval(),
        (torch.randn(2, 1, 8, 8),),
        buf,
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        dynamic_axes={"input": {0: "batch"}},
    )
    path.write_bytes(buf.getvalue())
    return path


_NPZ: dict[int, Path] = {}


def digits_subset(train_n: int) -> Path:
    """The digits dataset with its first `train_n` training samples (cached per process)."""
    if train_n not in _NPZ:
        d = zoo.digits_arrays()
        path = Path(tempfile.mkdtemp(prefix="methodkit-")) / f"digits-{train_n}.npz"
        np.savez(
            path, **{**d, "x_train": d["x_train"][:train_n], "y_train": d["y_train"][:train_n]}
        )
        _NPZ[train_n] = path
    return _NPZ[train_n]


def make_ctx(
    onnx_path: Path,
    method: str,
    target: dict,
    params: dict | None = None,
    train_n: int = 256,
    recovery: dict | None = None,
) -> PruneContext:
    """The pipeline's prune-stage context on the digits data (a subset, for speed): the
    engine's own `prepare()` (load, convert, analyse), then `Prepared.context()`."""
    spec = JobSpec(
        method={"name": method, "params": params or {}},
        target=target,
        recovery=recovery or {"epochs": 1},
    )
    prep = prepare(spec, onnx_path, digits_subset(train_n), catalog=registry, device="cpu")
    return prep.context()
