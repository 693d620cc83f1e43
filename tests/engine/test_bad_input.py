"""Bad input: each gets a clear error (exit 2) and nothing is written to OUTDIR."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

import zoo
from core.errors import BadDataset
from core.validation import datasets
from prunery.types import ExitCode
from server_cli import prune as local


def _cli(model: Path, data: Path, out: Path, *extra: str) -> int:
    return local.main(
        [
            str(model),
            "--data",
            str(data),
            "--target-flops",
            "0.5",
            "--epochs",
            "1",
            "--out",
            str(out),
            "--quiet",
            *extra,
        ]
    )


def _assert_refused(capsys, code: int, out: Path, *phrases: str) -> None:
    err = capsys.readouterr().err
    assert code == ExitCode.BAD_INPUT, err
    assert err.startswith("prunery prune: error:"), err
    for phrase in phrases:
        assert phrase.lower() in err.lower(), err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]


@pytest.fixture()
def vgg(zoo_model) -> Path:
    return zoo_model("vgg")


def test_truncated_onnx(tmp_path, vgg, digits_npz, capsys):
    bad = tmp_path / "trunc.onnx"
    bad.write_bytes(vgg.read_bytes()[: vgg.stat().st_size // 2])
    _assert_refused(
        capsys,
        _cli(bad, digits_npz, tmp_path / "o"),
        tmp_path / "o",
        "not a readable ONNX",
        "truncated",
    )


def test_not_onnx_at_all(tmp_path, digits_npz, capsys):
    bad = tmp_path / "x.onnx"
    bad.write_text("hello")
    _assert_refused(capsys, _cli(bad, digits_npz, tmp_path / "o"), tmp_path / "o", "ONNX")


def test_external_data_path_escape(tmp_path, vgg, digits_npz, capsys):
    m = onnx.load(str(vgg))
    t = m.graph.initializer[0]
    t.ClearField("raw_data")
    t.ClearField("float_data")
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "../../../etc/passwd"), ("offset", "0"), ("length", "64")):
        e = t.external_data.add()
        e.key, e.value = k, v
    bad = tmp_path / "escape.onnx"
    bad.write_bytes(m.SerializeToString())
    _assert_refused(
        capsys, _cli(bad, digits_npz, tmp_path / "o"), tmp_path / "o", "outside the upload"
    )


@pytest.mark.parametrize("opset", [7, 99])
def test_opset_out_of_range(tmp_path, vgg, digits_npz, capsys, opset):
    m = onnx.load(str(vgg))
    m.opset_import[0].version = opset
    bad = tmp_path / "opset.onnx"
    bad.write_bytes(m.SerializeToString())
    _assert_refused(
        capsys,
        _cli(bad, digits_npz, tmp_path / "o"),
        tmp_path / "o",
        f"opset {opset}",
        "supported range",
    )


def test_nan_weights(tmp_path, vgg, digits_npz, capsys):
    m = onnx.load(str(vgg))
    w = numpy_helper.to_array(m.graph.initializer[0]).copy()
    w.flat[0] = np.nan
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, m.graph.initializer[0].name))
    bad = tmp_path / "nan.onnx"
    bad.write_bytes(m.SerializeToString())
    _assert_refused(capsys, _cli(bad, digits_npz, tmp_path / "o"), tmp_path / "o", "NaN")


def test_pickled_npz(tmp_path, vgg, capsys):
    bad = tmp_path / "pickled.npz"
    np.savez(
        bad,
        x_train=np.array([{"a": 1}], dtype=object),
        y_train=np.zeros(1),
        x_test=np.zeros(1),
        y_test=np.zeros(1),
    )
    _assert_refused(capsys, _cli(vgg, bad, tmp_path / "o"), tmp_path / "o", "pickle")


def test_wrong_input_shape(tmp_path, vgg, capsys):
    bad = tmp_path / "shape.npz"
    rng = np.random.default_rng(0)
    np.savez(
        bad,
        x_train=rng.random((20, 1, 10, 10), dtype=np.float32),
        y_train=np.zeros(20, np.int64),
        x_test=rng.random((5, 1, 10, 10), dtype=np.float32),
        y_test=np.zeros(5, np.int64),
    )
    _assert_refused(
        capsys, _cli(vgg, bad, tmp_path / "o"), tmp_path / "o", "[1, 10, 10]", "expects"
    )


def test_labels_beyond_model_outputs(tmp_path, vgg, capsys):
    d = zoo.digits_arrays()
    d["y_train"] = d["y_train"] + 5
    bad = tmp_path / "labels.npz"
    np.savez(bad, **d)
    _assert_refused(capsys, _cli(vgg, bad, tmp_path / "o"), tmp_path / "o", "outputs 10 classes")


def test_missing_arrays_in_npz(tmp_path, vgg, capsys):
    bad = tmp_path / "keys.npz"
    np.savez(bad, images=np.zeros((3, 1, 8, 8), np.float32))
    _assert_refused(capsys, _cli(vgg, bad, tmp_path / "o"), tmp_path / "o", "x_train")


def test_unknown_method_and_bad_params(tmp_path, vgg, digits_npz, capsys):
    _assert_refused(
        capsys,
        local.main(
            [
                str(vgg),
                "--data",
                str(digits_npz),
                "--method",
                "magic",
                "--target-flops",
                "0.5",
                "--out",
                str(tmp_path / "o"),
                "--quiet",
            ]
        ),
        tmp_path / "o",
        "unknown method",
        "l1_norm",
    )
    _assert_refused(
        capsys,
        _cli(vgg, digits_npz, tmp_path / "o", "--method-param", "allocation=sideways"),
        tmp_path / "o",
        "allocation",
    )


def test_unreachable_budget(tmp_path, vgg, digits_npz, capsys):
    code = local.main(
        [
            str(vgg),
            "--data",
            str(digits_npz),
            "--target-flops",
            "0.01",
            "--out",
            str(tmp_path / "o"),
            "--quiet",
        ]
    )
    # The one thing left behind is the analysis, so the excluded layers can be read.
    analysis = tmp_path / "o" / "analysis.json"
    assert analysis.is_file()
    analysis.unlink()
    (tmp_path / "o").rmdir()
    _assert_refused(capsys, code, tmp_path / "o", "budget_unreachable", "analysis.json")


def _png(value: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_archive_with_parent_path(tmp_path, vgg, capsys):
    bad = tmp_path / "evil.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("train/0/a.png", _png(1))
        zf.writestr("../../evil.png", _png(2))
    _assert_refused(capsys, _cli(vgg, bad, tmp_path / "o"), tmp_path / "o", "unsafe path")
    bad_tar = tmp_path / "evil.tar"
    with tarfile.open(bad_tar, "w") as tf:
        info = tarfile.TarInfo("train/../../../x.png")
        data = _png(3)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    _assert_refused(capsys, _cli(vgg, bad_tar, tmp_path / "o"), tmp_path / "o", "unsafe path")


def test_archive_with_symlink(tmp_path):
    bad = tmp_path / "link.tar"
    with tarfile.open(bad, "w") as tf:
        info = tarfile.TarInfo("train/0/link.png")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tf.addfile(info)
    with pytest.raises(BadDataset, match="link"):
        datasets.load_dataset(bad)


def test_zip_bomb(tmp_path, vgg, capsys):
    bad = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bad, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("train/0/a.png", b"\0" * (64 * 1024 * 1024))
    assert bad.stat().st_size < 1024 * 1024
    _assert_refused(capsys, _cli(vgg, bad, tmp_path / "o"), tmp_path / "o", "zip bomb")


def test_image_folder_archive_loads(tmp_path):
    """The happy path of an archive: classes from folder names, declared normalisation."""
    good = tmp_path / "imgs.zip"
    with zipfile.ZipFile(good, "w") as zf:
        for split, n in (("train", 6), ("test", 2)):
            for cls in ("cat", "dog"):
                for i in range(n):
                    zf.writestr(f"root/{split}/{cls}/{i}.png", _png(200 if cls == "dog" else 10))
    ds = datasets.load_dataset(good, grayscale=True, mean=[0.5], std=[0.25])
    assert ds.x_train.shape == (12, 1, 8, 8) and ds.x_test.shape == (4, 1, 8, 8)
    assert ds.classes == ["cat", "dog"] and set(ds.y_train.tolist()) == {0, 1}
    np.testing.assert_allclose(
        ds.x_train[ds.y_train == 1].max(), (200 / 255 - 0.5) / 0.25, rtol=1e-5
    )


def test_outdir_untouched_on_failure_when_it_exists(tmp_path, digits_npz, capsys):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x01garbage")
    code = _cli(bad, digits_npz, out)
    assert code == ExitCode.BAD_INPUT
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
