"""Issue 9's inputs: a separate evaluation dataset, uint8 image arrays, a model with two
outputs (a clear refusal), and `--debug` for internal errors of `prunery prune`."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

import zoo
from core.errors import BadModel
from engine import run
from methods import registry
from prunery.spec import JobSpec
from prunery.types import ExitCode
from server_cli import prune as local

SPEC = {"method": {"name": "l1_norm"}, "target": {"flops": 0.5}, "recovery": {"mode": "none"}}


def _onnx_accuracy(path, x: np.ndarray, y: np.ndarray) -> float:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: x})[0]
    return float((logits.argmax(1) == y).mean())


def test_evaluation_dataset_is_what_the_report_measures(zoo_model, digits_npz, tmp_path):
    arrays = zoo.digits_arrays()
    x, y = arrays["x_test"][:100], arrays["y_test"][:100]
    eval_npz = tmp_path / "eval.npz"
    np.savez(eval_npz, x=x, y=y)  # only x and y: every sample is evaluated
    out = tmp_path / "out"
    report = run(
        JobSpec(**SPEC),
        zoo_model("vgg"),
        digits_npz,
        out,
        latency_runs=3,
        eval_data_path=eval_npz,
        catalog=registry,
    )
    assert report.evaluation == {
        "dataset": "evaluation dataset",
        "file": "eval.npz",
        "split": "all samples",
        "samples": 100,
    }
    assert report.accuracy.samples == 100 and "evaluation dataset" in report.accuracy.measured_with
    assert report.accuracy.before == pytest.approx(_onnx_accuracy(zoo_model("vgg"), x, y))
    assert report.accuracy.after == pytest.approx(_onnx_accuracy(out / "model.onnx", x, y))

    plain = run(
        JobSpec(**SPEC),
        zoo_model("vgg"),
        digits_npz,
        tmp_path / "plain",
        latency_runs=3,
        catalog=registry,
    )
    assert plain.evaluation == {"dataset": "test split", "samples": 360}


def test_evaluation_dataset_with_other_samples_is_refused(zoo_model, digits_npz, tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((10, 1, 4, 4), np.float32), y=np.zeros(10, np.int64))
    from core.errors import BadDataset

    with pytest.raises(BadDataset, match="evaluation dataset's samples have shape"):
        run(
            JobSpec(**SPEC),
            zoo_model("vgg"),
            digits_npz,
            tmp_path / "o",
            latency_runs=3,
            eval_data_path=bad,
            catalog=registry,
        )


def test_uint8_images_are_cast_with_the_declared_scaling(zoo_model, tmp_path):
    arrays = zoo.digits_arrays()  # the zoo trains on (pixels in [0, 1] - 0.3) / 0.4
    as_uint8 = {
        k: (np.round((v * 0.4 + 0.3) * 255).astype(np.uint8) if k.startswith("x") else v)
        for k, v in arrays.items()
    }
    data = tmp_path / "u8.npz"
    np.savez(data, **as_uint8)
    spec = JobSpec(**SPEC, data={"mean": [0.3], "std": [0.4]})
    report = run(spec, zoo_model("vgg"), data, tmp_path / "out", latency_runs=3, catalog=registry)
    assert any(
        "uint8 inputs were cast to float32 (x0.00392157, minus mean [0.3], over std [0.4])" in n
        for n in report.notes
    ), report.notes
    expected = _onnx_accuracy(zoo_model("vgg"), arrays["x_test"], arrays["y_test"])
    assert report.accuracy.before == pytest.approx(expected, abs=0.02)


def test_two_output_model_is_refused_with_what_to_do(digits_npz, tmp_path):
    class TwoHeads(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
            self.fc = torch.nn.Linear(8, 10)

        def forward(self, x):
            f = self.conv(x).mean((2, 3))
            return self.fc(f), f

    path = tmp_path / "two.onnx"
    torch.onnx.export(
        TwoHeads().eval(),
        (torch.rand(1, 1, 8, 8),),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["x"],
        output_names=["logits", "features"],
        dynamic_axes={"x": {0: "b"}},
    )
    with pytest.raises(BadModel, match="2 outputs \\(logits, features\\).*export only the logits"):
        run(JobSpec(**SPEC), path, digits_npz, tmp_path / "out", latency_runs=3, catalog=registry)


def test_debug_prints_the_traceback_of_an_internal_error(
    zoo_model, digits_npz, tmp_path, monkeypatch, capsys
):
    import engine

    def boom(*args, **kwargs):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(engine, "run", boom)
    argv = [
        str(zoo_model("vgg")),
        "--data",
        str(digits_npz),
        "--target-flops",
        "0.5",
        "--out",
        str(tmp_path / "o"),
        "--quiet",
    ]
    assert local.main(argv) == ExitCode.JOB_FAILED
    err = capsys.readouterr().err
    assert "internal error: RuntimeError: planted failure" in err and "Traceback" not in err
    assert "--debug" in err
    assert local.main([*argv, "--debug"]) == ExitCode.JOB_FAILED
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in boom" in err
    monkeypatch.setenv("PRUNERY_DEBUG", "1")
    assert local.main(argv) == ExitCode.JOB_FAILED
    assert "Traceback (most recent call last)" in capsys.readouterr().err
    assert not list(tmp_path.glob(".o.tmp-*"))  # nothing half-written left behind
