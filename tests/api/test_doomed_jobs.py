"""Jobs that the uploads already doom are refused at `POST /v1/jobs` (422, the error body)
with the code and message `prunery prune` gives for the same files; a model whose weights are
in an external-data file is accepted as a .zip and stored as one self-contained .onnx."""

from __future__ import annotations

import hashlib
from pathlib import Path

import onnx
import pytest
from apikit import job_spec
from doomedkit import (
    cli_error,
    doomed_files,
    external_data_pair,
    zip_of,
)

from core.validation.onnx_checks import EMBED_RECIPE


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return doomed_files(tmp_path_factory.mktemp("doomed-api"))


def _upload(client, headers, route: str, path: Path, name: str | None = None) -> dict:  # type: ignore[no-untyped-def, type-arg]
    r = client.post(route, headers=headers, files={"file": (name or path.name, path.read_bytes())})
    assert r.status_code == 201, r.text
    return r.json()


def _jobs(client, headers) -> int:  # type: ignore[no-untyped-def]
    return client.get("/v1/jobs", headers=headers).json()["count"]


@pytest.mark.parametrize(
    ("model", "data", "code", "start"),
    [
        ("two_inputs", "data", "bad_model", "the model has 2 inputs (a, b);"),
        ("ten_classes", "data97", "bad_dataset", "the labels go up to class 97 but the model"),
    ],
)
def test_doomed_job_is_refused_at_submit_with_the_cli_message(
    client, tenant, files, tmp_path, capsys, model, data, code, start
):
    cli_code, cli_message = cli_error(files[model], files[data], tmp_path / "out", capsys)
    assert cli_code == code and cli_message.startswith(start)
    h = tenant["headers"]
    m = _upload(client, h, "/v1/models", files[model])
    d = _upload(client, h, "/v1/datasets", files[data])
    r = client.post("/v1/jobs", headers=h, json=job_spec(m["id"], d["id"]))
    assert r.status_code == 422, r.text
    assert r.json() == {"error": cli_code, "detail": cli_message}
    assert _jobs(client, h) == 0


def test_a_fitting_job_is_still_accepted(client, tenant, files):
    h = tenant["headers"]
    m = _upload(client, h, "/v1/models", files["ten_classes"])
    d = _upload(client, h, "/v1/datasets", files["data"])
    r = client.post("/v1/jobs", headers=h, json=job_spec(m["id"], d["id"]))
    assert r.status_code == 202, r.text
    # With a separate evaluation set the label range is left to the engine (see interface.py).
    d97 = _upload(client, h, "/v1/datasets", files["data97"])
    r = client.post(
        "/v1/jobs", headers=h, json=job_spec(m["id"], d97["id"], eval_dataset_id=d["id"])
    )
    assert r.status_code == 202, r.text


def test_model_with_external_data_uploads_as_a_zip(client, tenant, files, tmp_path):
    h = tenant["headers"]
    pair = external_data_pair(files["ten_classes"], tmp_path / "export")
    data = (tmp_path / "export" / "model.onnx.data").read_bytes()
    first = onnx.load(str(pair), load_external_data=False).graph.initializer[0].name

    # The .onnx alone: refused, saying exactly how to send it.
    r = client.post("/v1/models", headers=h, files={"file": ("model.onnx", pair.read_bytes())})
    assert r.status_code == 422, r.text
    assert r.json() == {
        "error": "bad_model",
        "detail": f"initializer {first!r} needs external data file 'model.onnx.data', which is "
        f"not beside the .onnx file (it was not uploaded with it); {EMBED_RECIPE}",
    }

    # The pair as a .zip: stored as one self-contained .onnx.
    bundle = zip_of({"resnet/model.onnx": pair.read_bytes(), "resnet/model.onnx.data": data})
    r = client.post("/v1/models", headers=h, files={"file": ("resnet.zip", bundle)})
    assert r.status_code == 201, r.text
    model = r.json()
    assert model["filename"] == "model.onnx"
    assert model["outputs"][0]["shape"] == ["batch", 10] and model["parameter_count"] > 0
    stored = b"".join(client.app.state.storage.open_chunks(_storage_key(client, model["id"])))
    assert hashlib.sha256(stored).hexdigest() == model["sha256"]
    assert len(stored) == model["size_bytes"]
    embedded = onnx.load_from_string(stored)
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in embedded.graph.initializer)

    # The same zip again, or the embedded file itself: the same model (200).
    again = client.post("/v1/models", headers=h, files={"file": ("resnet.zip", bundle)})
    assert (again.status_code, again.json()["id"]) == (200, model["id"])
    same = client.post("/v1/models", headers=h, files={"file": ("m.onnx", stored)})
    assert (same.status_code, same.json()["id"]) == (200, model["id"])

    d = _upload(client, h, "/v1/datasets", files["data"])
    r = client.post("/v1/jobs", headers=h, json=job_spec(model["id"], d["id"]))
    assert r.status_code == 202, r.text


def _storage_key(client, model_id: str) -> str:  # type: ignore[no-untyped-def]
    from core.orm import ModelFile

    with client.app.state.sessionmaker() as s:
        return s.get(ModelFile, model_id).storage_key


@pytest.mark.parametrize(
    ("members", "fragment"),
    [
        ({"model.onnx": b"ONNX", "../model.onnx.data": b"\0" * 8}, "unsafe path"),
        ({"a.onnx": b"x", "b.onnx": b"y"}, "exactly one .onnx file (found a.onnx, b.onnx)"),
    ],
)
def test_hostile_model_zip_is_refused(client, tenant, members, fragment):
    r = client.post(
        "/v1/models", headers=tenant["headers"], files={"file": ("m.zip", zip_of(members))}
    )
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "bad_model" and fragment in r.json()["detail"]
    assert client.get("/v1/models", headers=tenant["headers"]).json()["count"] == 0
