"""The doomed-job checks shared by the engine and `POST /v1/jobs` (core.validation.interface),
and models with external data (core.validation.onnx_bundle): the message the API would give
from the upload records is the one `prunery prune` prints; a model .zip becomes one file."""

from __future__ import annotations

import json
import stat
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from doomedkit import (
    cli_error,
    doomed_files,
    external_data_pair,
    zip_of,
)
from onnx import numpy_helper

from core.errors import BadDataset, BadModel
from core.validation.dataset_checks import inspect_dataset
from core.validation.interface import (
    check_dataset_fits_model,
    check_logits_cover_labels,
    check_model_summary,
    declared_logits_width,
)
from core.validation.onnx_bundle import embed_bundle, is_zip
from core.validation.onnx_checks import EMBED_RECIPE, inspect_model


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return doomed_files(tmp_path_factory.mktemp("doomed"))


def _upload_records(model: Path, data: Path) -> tuple[dict, dict]:  # type: ignore[type-arg]
    """What the API stores at upload (see app/features/{models,datasets}/service.py)."""
    return inspect_model(model).as_dict(), inspect_dataset(data).describe()


def test_two_inputs_refused_from_the_upload_record_with_the_cli_message(files, tmp_path, capsys):
    code, message = cli_error(files["two_inputs"], files["data"], tmp_path / "o", capsys)
    model, _ = _upload_records(files["two_inputs"], files["data"])
    with pytest.raises(BadModel) as exc:
        check_model_summary(model)
    assert (exc.value.code, exc.value.message) == (code, message)
    assert message.startswith("the model has 2 inputs (a, b);")


def test_labels_beyond_the_outputs_refused_with_the_cli_message(files, tmp_path, capsys):
    code, message = cli_error(files["ten_classes"], files["data97"], tmp_path / "o", capsys)
    model, data = _upload_records(files["ten_classes"], files["data97"])
    assert data["num_classes"] == 98 and model["outputs"][0]["shape"] == ["batch", 10]
    check_model_summary(model)  # one input, one output: fine
    with pytest.raises(BadDataset) as exc:
        check_dataset_fits_model(model, data, "classification")
    assert (exc.value.code, exc.value.message) == (code, message)
    assert message.startswith("the labels go up to class 97 but the model outputs 10 classes")


def test_a_dataset_that_fits_passes(files):
    model, data = _upload_records(files["ten_classes"], files["data"])
    check_model_summary(model)
    check_dataset_fits_model(model, data, "classification")
    # With a separate evaluation set the label range is the engine's to judge.
    _, data97 = _upload_records(files["ten_classes"], files["data97"])
    check_dataset_fits_model(model, data97, "classification", separate_evaluation=True)


def test_widths_the_upload_does_not_fix_are_left_to_the_engine():
    out = {"name": "logits", "shape": ["batch", "classes"], "dtype": "float"}
    assert declared_logits_width(out, "classification") is None
    assert declared_logits_width({"shape": [1, 10, 2]}, "classification") is None
    assert declared_logits_width({"shape": [1, 10]}, "classification") == 10
    assert declared_logits_width({"shape": ["b", 32, 100]}, "language_modeling", [32]) == 100
    # A token dim other than the samples': the engine's shape message comes first there.
    assert declared_logits_width({"shape": ["b", 16, 100]}, "language_modeling", [32]) is None
    with pytest.raises(BadDataset, match=r"token ids go up to 119 but .* has 100 entries"):
        check_logits_cover_labels("language_modeling", 120, 100)
    check_logits_cover_labels("language_modeling", 100, 100)


# ---------------------------------------------------------------- external data


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_a_zip_of_model_and_data_becomes_one_self_contained_onnx(files, tmp_path):
    pair = external_data_pair(files["ten_classes"], tmp_path / "export")
    data = (tmp_path / "export" / "model.onnx.data").read_bytes()
    assert onnx.load(str(pair), load_external_data=False).graph.initializer[0].data_location == 1
    bundle = tmp_path / "model.zip"
    bundle.write_bytes(
        zip_of({"export/model.onnx": pair.read_bytes(), "export/model.onnx.data": data})
    )
    assert is_zip(bundle) and not is_zip(files["ten_classes"])
    out = tmp_path / "embedded.onnx"
    assert embed_bundle(bundle, out) == "model.onnx"
    embedded = onnx.load(str(out), load_external_data=False)
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in embedded.graph.initializer)
    original = _initializers(onnx.load(str(files["ten_classes"])))
    got = _initializers(embedded)
    assert original.keys() == got.keys()
    assert all(np.array_equal(original[k], got[k]) for k in original)
    assert inspect_model(out).outputs[0].shape == ["batch", 10]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".bundle-")] == []


def test_the_onnx_alone_is_refused_with_how_to_embed(files, tmp_path):
    pair = external_data_pair(files["ten_classes"], tmp_path / "export")
    alone = tmp_path / "alone" / "model.onnx"
    alone.parent.mkdir()
    alone.write_bytes(pair.read_bytes())
    first = onnx.load(str(pair), load_external_data=False).graph.initializer[0].name
    with pytest.raises(BadModel) as exc:
        inspect_model(alone)
    assert exc.value.message == (
        f"initializer {first!r} needs external data file 'model.onnx.data', which is not beside "
        f"the .onnx file (it was not uploaded with it); {EMBED_RECIPE}"
    )
    # The recipe works as written.
    m = onnx.load(str(pair))
    onnx.save_model(m, str(tmp_path / "model_embedded.onnx"), save_as_external_data=False)
    assert inspect_model(tmp_path / "model_embedded.onnx").parameter_count > 0


def test_the_engine_loads_a_model_with_its_data_beside_it(files, tmp_path):
    from engine import load

    pair = external_data_pair(files["ten_classes"], tmp_path / "export")
    loaded = load.load(pair, (1, 8, 8))
    assert loaded.parity_rel <= load.PARITY_RTOL
    with pytest.raises(BadModel, match=r"this is a \.zip, not an \.onnx file"):
        bundle = tmp_path / "m.zip"
        bundle.write_bytes(zip_of({"model.onnx": pair.read_bytes()}))
        load.load(bundle, (1, 8, 8))


def _zip_with_symlink(path: Path, onnx_bytes: bytes) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("model.onnx", onnx_bytes)
        link = zipfile.ZipInfo("model.onnx.data")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("traversal", "unsafe path"),
        ("absolute", "unsafe path"),
        ("symlink", "symbolic link"),
        ("two_models", "exactly one .onnx file (found a.onnx, b.onnx)"),
        ("no_model", "exactly one .onnx file (found none)"),
        ("data_missing", EMBED_RECIPE),
        ("too_big", "zip bomb"),
        ("not_a_zip", "cannot be unpacked"),
    ],
)
def test_hostile_or_broken_bundles_are_refused(files, tmp_path, case, fragment):
    pair = external_data_pair(files["ten_classes"], tmp_path / "export")
    onnx_bytes, data = pair.read_bytes(), (tmp_path / "export" / "model.onnx.data").read_bytes()
    bundle = tmp_path / "bundle.zip"
    max_bytes = 50 * 1024**2
    if case == "traversal":
        bundle.write_bytes(zip_of({"model.onnx": onnx_bytes, "../model.onnx.data": data}))
    elif case == "absolute":
        bundle.write_bytes(zip_of({"/tmp/model.onnx": onnx_bytes}))
    elif case == "symlink":
        _zip_with_symlink(bundle, onnx_bytes)
    elif case == "two_models":
        bundle.write_bytes(zip_of({"a.onnx": onnx_bytes, "b.onnx": onnx_bytes}))
    elif case == "no_model":
        bundle.write_bytes(zip_of({"model.onnx.data": data}))
    elif case == "data_missing":
        bundle.write_bytes(zip_of({"model.onnx": onnx_bytes}))
    elif case == "too_big":
        bundle.write_bytes(zip_of({"model.onnx": onnx_bytes, "model.onnx.data": data}))
        max_bytes = len(data) // 2
    else:
        bundle.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    with pytest.raises(BadModel) as exc:
        embed_bundle(bundle, tmp_path / "out.onnx", max_bytes=max_bytes)
    assert fragment in exc.value.message
    assert not (tmp_path / "out.onnx").exists()
    assert not (tmp_path / "model.onnx.data").exists()  # nothing written outside
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".bundle-")] == []


def test_prunery_prune_takes_the_same_zip_the_api_takes(zoo_model, digits_npz, tmp_path, capsys):
    """`prunery prune model.zip` embeds the bundle with the service's guards, prunes the
    self-contained model and leaves no unpacked folder behind; a hostile zip is refused
    before anything is written."""
    from prunery.types import ExitCode
    from server_cli import prune as local

    pair = external_data_pair(zoo_model("vgg"), tmp_path / "export")
    data = (tmp_path / "export" / "model.onnx.data").read_bytes()
    bundle = tmp_path / "model.zip"
    bundle.write_bytes(zip_of({"model.onnx": pair.read_bytes(), "model.onnx.data": data}))
    out = tmp_path / "out"
    argv = ["--data", str(digits_npz), "--method", "l1_norm", "--target-flops", "0.5"]
    argv += ["--epochs", "0", "--min-speedup", "null", "--latency-runs", "20", "--quiet"]
    rc = local.main([str(bundle), *argv, "--out", str(out)])
    assert rc == ExitCode.OK, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert abs(report["target"]["achieved"] - 0.5) <= 0.01
    assert onnx.load(str(out / "model.onnx")).graph.node
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".bundle-")]

    hostile = tmp_path / "hostile.zip"
    hostile.write_bytes(zip_of({"model.onnx": pair.read_bytes(), "../model.onnx.data": data}))
    capsys.readouterr()
    rc = local.main([str(hostile), *argv, "--out", str(tmp_path / "never")])
    err = capsys.readouterr().err
    assert rc == ExitCode.BAD_INPUT and "bad_model" in err and "unsafe path" in err, err
    assert not (tmp_path / "never").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".bundle-")]
