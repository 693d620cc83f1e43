"""Inputs of jobs that upload-time facts already doom, and the message `prunery prune` gives
for each (tests/core/test_submit_checks.py, tests/api/test_doomed_jobs.py)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CLI_PREFIX = "prunery prune: error: "


def two_input_onnx(path: Path) -> Path:
    """A valid ONNX classifier with two graph inputs (a and b, each [batch, 1, 8, 8])."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((64, 10)).astype(np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["a", "b"], ["s"]),
            helper.make_node("Flatten", ["s"], ["f"], axis=1),
            helper.make_node("MatMul", ["f", "w"], ["logits"]),
        ],
        "two_inputs",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 1, 8, 8]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", 1, 8, 8]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path), save_as_external_data=False)
    return path


def ten_class_onnx(path: Path) -> Path:
    """A prunable conv net for [batch, 1, 8, 8] inputs with 10 output classes (torch export)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10)
    ).eval()
    torch.onnx.export(
        net,
        (torch.zeros(1, 1, 8, 8),),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["x"],
        output_names=["logits"],
        dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
    )
    return path


def npz(path: Path, max_label: int = 9, n_train: int = 40, n_test: int = 10) -> Path:
    """Images [N, 1, 8, 8]; one training label is `max_label` (the rest are 0..9)."""
    rng = np.random.default_rng(0)
    y_train = rng.integers(0, 10, n_train)
    y_train[3] = max_label
    np.savez(
        path,
        x_train=rng.random((n_train, 1, 8, 8), dtype=np.float32),
        y_train=y_train,
        x_test=rng.random((n_test, 1, 8, 8), dtype=np.float32),
        y_test=rng.integers(0, 10, n_test),
    )
    return path


def external_data_pair(src: Path, folder: Path, name: str = "model.onnx") -> Path:
    """`src` saved as torch.onnx.export's default does for large models: `name` plus
    `name.data` holding every initializer."""
    folder.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(src))
    onnx.save_model(
        model,
        str(folder / name),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=f"{name}.data",
        size_threshold=0,
    )
    return folder / name


def zip_of(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def cli_error(model: Path, data: Path, out: Path, capsys) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    """(code, message) of the error `prunery prune` prints for this model and dataset."""
    from prunery.types import ExitCode
    from server_cli import prune as local

    capsys.readouterr()
    rc = local.main(
        [
            str(model),
            "--data",
            str(data),
            "--method",
            "l1_norm",
            "--target-flops",
            "0.5",
            "--epochs",
            "1",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == ExitCode.BAD_INPUT, err
    assert err.startswith(CLI_PREFIX), err
    code, _, message = err[len(CLI_PREFIX) :].partition(": ")
    return code, message


def doomed_files(d: Path) -> dict[str, Path]:
    """The inputs both tiers check: a two-input model, a 10-class model, a fitting dataset
    and one with labels up to 97."""
    return {
        "two_inputs": two_input_onnx(d / "two.onnx"),
        "ten_classes": ten_class_onnx(d / "ten.onnx"),
        "data": npz(d / "ok.npz"),
        "data97": npz(d / "labels97.npz", max_label=97),
    }
