"""Models and datasets: streamed uploads, validation, dedupe, GET/list/DELETE, 413/415."""

from __future__ import annotations

import hashlib
import io
import zipfile

import numpy as np
from apikit import job_spec, npz_bytes


def test_model_upload_describes_the_graph(client, tenant, onnx_bytes):
    r = client.post(
        "/v1/models", headers=tenant["headers"], files={"file": ("net.onnx", onnx_bytes)}
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert r.headers["location"] == f"/v1/models/{body['id']}"
    assert body["id"].startswith("mdl_")
    assert body["sha256"] == hashlib.sha256(onnx_bytes).hexdigest()
    assert body["size_bytes"] == len(onnx_bytes)
    assert body["opset"] == 17
    assert body["inputs"] == [{"name": "x", "shape": ["batch", 1, 8, 8], "dtype": "float"}]
    assert body["outputs"][0]["shape"] == ["batch", 10]
    assert body["op_histogram"] == {"Conv": 1, "Flatten": 1, "Gemm": 1, "Relu": 1}
    assert body["parameter_count"] == 8 * 9 + 8 + 8 * 64 * 10 + 10
    assert body["filename"] == "net.onnx"


def test_model_upload_dedupes_by_sha256(client, tenant, onnx_bytes):
    h = tenant["headers"]
    first = client.post("/v1/models", headers=h, files={"file": ("a.onnx", onnx_bytes)})
    again = client.post("/v1/models", headers=h, files={"file": ("b.onnx", onnx_bytes)})
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert client.get("/v1/models", headers=h).json()["count"] == 1


def test_model_get_list_delete(client, tenant, onnx_bytes):
    h = tenant["headers"]
    mid = client.post("/v1/models", headers=h, files={"file": ("a.onnx", onnx_bytes)}).json()["id"]
    assert client.get(f"/v1/models/{mid}", headers=h).json()["id"] == mid
    listing = client.get("/v1/models", headers=h, params={"limit": 1}).json()
    assert listing["count"] == 1 and listing["data"][0]["id"] == mid
    storage = client.app.state.storage
    from core.storage import model_key

    assert storage.exists(model_key(tenant["tenant_id"], mid))
    assert client.delete(f"/v1/models/{mid}", headers=h).status_code == 204
    assert not storage.exists(model_key(tenant["tenant_id"], mid))
    r = client.get(f"/v1/models/{mid}", headers=h)
    assert r.status_code == 404 and r.json()["error"] == "not_found"


def test_invalid_onnx_is_422_with_a_fix(client, tenant):
    r = client.post(
        "/v1/models",
        headers=tenant["headers"],
        files={"file": ("x.onnx", b"not a protobuf at all" * 10)},
    )
    assert r.status_code == 422
    assert r.json()["error"] == "bad_model"
    assert "re-export" in r.json()["detail"]
    # Nothing half-written is left behind.
    assert client.get("/v1/models", headers=tenant["headers"]).json()["count"] == 0
    staging = client.app.state.storage.staging_dir()
    assert not any(p.name.startswith("up-") for p in staging.iterdir())


def test_upload_must_be_multipart(client, tenant, onnx_bytes):
    r = client.post(
        "/v1/models",
        headers={**tenant["headers"], "Content-Type": "application/octet-stream"},
        content=onnx_bytes,
    )
    assert r.status_code == 415
    assert r.json()["error"] == "unsupported_media_type"


def test_upload_without_file_part_is_400(client, tenant):
    r = client.post("/v1/models", headers=tenant["headers"], files={"other": ("x.onnx", b"abc")})
    assert r.status_code == 400
    assert "'file'" in r.json()["detail"]


def test_oversized_upload_is_413_by_content_length(make_client, new_tenant):
    small = make_client(max_model_bytes=100_000)
    t = new_tenant()
    r = small.post(
        "/v1/models", headers=t["headers"], files={"file": ("big.onnx", b"\0" * 300_000)}
    )
    assert r.status_code == 413
    assert r.json()["error"] == "payload_too_large"
    assert "100000" in r.json()["detail"]


def test_oversized_streamed_upload_is_413_midstream(make_client, new_tenant):
    """No Content-Length (chunked): the limit is enforced while streaming."""
    small = make_client(max_dataset_bytes=100_000)
    t = new_tenant()
    boundary = "testboundary"

    def body():
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.npz"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        for _ in range(50):
            yield b"\1" * 10_000
        yield f"\r\n--{boundary}--\r\n".encode()

    r = small.post(
        "/v1/datasets",
        headers={**t["headers"], "Content-Type": f"multipart/form-data; boundary={boundary}"},
        content=body(),
    )
    assert r.status_code == 413
    assert r.json()["error"] == "payload_too_large"
    staging = small.app.state.storage.staging_dir()
    assert not any(p.name.startswith("up-") for p in staging.iterdir())


def test_dataset_npz_upload_and_dedupe(client, tenant):
    h = tenant["headers"]
    data = npz_bytes(n_train=30, n_test=12)
    r = client.post("/v1/datasets", headers=h, files={"file": ("digits.npz", data)})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["format"] == ".npz" and body["task"] == "classification"
    assert (body["train"], body["test"], body["sample_shape"]) == (30, 12, [1, 8, 8])
    assert body["num_classes"] <= 10
    again = client.post("/v1/datasets", headers=h, files={"file": ("copy.npz", data)})
    assert again.status_code == 200 and again.json()["id"] == body["id"]
    # Stored with its suffix (the engine picks the reader by it).
    key = client.app.state.storage.path(f"tenants/{tenant['tenant_id']}/datasets/{body['id']}.npz")
    assert key.is_file()
    assert (
        client.get(f"/v1/datasets/{body['id']}", headers=h).json()["sha256"]
        == hashlib.sha256(data).hexdigest()
    )
    assert client.delete(f"/v1/datasets/{body['id']}", headers=h).status_code == 204
    assert client.get(f"/v1/datasets/{body['id']}", headers=h).status_code == 404


def test_dataset_image_archive(client, tenant):
    from PIL import Image

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for split, n in (("train", 4), ("test", 2)):
            for cls in ("cat", "dog"):
                for i in range(n):
                    img = io.BytesIO()
                    Image.fromarray((np.random.rand(8, 8, 3) * 255).astype("uint8")).save(
                        img, "PNG"
                    )
                    zf.writestr(f"{split}/{cls}/{i}.png", img.getvalue())
    r = client.post(
        "/v1/datasets", headers=tenant["headers"], files={"file": ("pets.zip", buf.getvalue())}
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["format"] == ".zip"
    assert (body["train"], body["test"], body["sample_shape"], body["classes"]) == (
        8,
        4,
        [3, 8, 8],
        ["cat", "dog"],
    )


def test_dataset_unknown_format_is_415(client, tenant):
    r = client.post(
        "/v1/datasets", headers=tenant["headers"], files={"file": ("data.csv", b"a,b\n1,2\n")}
    )
    assert r.status_code == 415
    assert ".npz" in r.json()["detail"]


def test_dataset_with_pickled_arrays_is_422(client, tenant):
    buf = io.BytesIO()
    np.savez(
        buf,
        x_train=np.array([{"a": 1}], dtype=object),
        y_train=np.zeros(1),
        x_test=np.zeros(1),
        y_test=np.zeros(1),
    )
    r = client.post(
        "/v1/datasets", headers=tenant["headers"], files={"file": ("evil.npz", buf.getvalue())}
    )
    assert r.status_code == 422
    assert r.json()["error"] == "bad_dataset"
    assert "pickle" in r.json()["detail"]


def test_dataset_archive_with_path_escape_is_422(client, tenant):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("../../etc/evil.png", b"x")
    r = client.post(
        "/v1/datasets", headers=tenant["headers"], files={"file": ("evil.zip", buf.getvalue())}
    )
    assert r.status_code == 422
    assert "unsafe path" in r.json()["detail"]


def test_delete_input_of_active_job_is_409(client, uploaded):
    h = uploaded["headers"]
    r = client.post(
        "/v1/jobs", headers=h, json=job_spec(uploaded["model_id"], uploaded["dataset_id"])
    )
    assert r.status_code == 202
    for path in (f"/v1/models/{uploaded['model_id']}", f"/v1/datasets/{uploaded['dataset_id']}"):
        r2 = client.delete(path, headers=h)
        assert r2.status_code == 409
        assert r.json()["id"] in r2.json()["detail"]
    # Once the job is over, the inputs can go (the job keeps its history).
    client.post(f"/v1/jobs/{r.json()['id']}/cancel", headers=h)
    assert client.delete(f"/v1/models/{uploaded['model_id']}", headers=h).status_code == 204
    job = client.get(f"/v1/jobs/{r.json()['id']}", headers=h).json()
    assert job["status"] == "cancelled" and job["model_id"] is None
