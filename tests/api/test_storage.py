"""Artifact storage: atomic local writes and the S3 backend (moto's in-process S3)."""

from __future__ import annotations

import pytest
from apikit import npz_bytes


def test_local_put_is_atomic_and_keys_are_checked(tmp_path):
    from core.storage import LocalStorage

    store = LocalStorage(tmp_path / "store")
    src = store.staging_dir() / "x.bin"
    src.write_bytes(b"a" * 1000)
    store.put_file(src, "tenants/t/jobs/j/model.onnx")
    assert not src.exists()  # moved, not copied
    dest = store.path("tenants/t/jobs/j/model.onnx")
    assert dest.read_bytes() == b"a" * 1000
    assert [p.name for p in dest.parent.iterdir()] == ["model.onnx"]  # no temp files left
    assert b"".join(store.open_chunks("tenants/t/jobs/j/model.onnx")) == b"a" * 1000
    assert store.size("tenants/t/jobs/j/model.onnx") == 1000
    for bad in ("../escape", "/abs/path", "a/../../b", ""):
        with pytest.raises(ValueError):
            store.path(bad)
    store.delete_prefix("tenants/t/jobs/j")
    assert not store.exists("tenants/t/jobs/j/model.onnx")


@pytest.fixture()
def s3(monkeypatch):
    moto = pytest.importorskip("moto")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with moto.mock_aws():
        import boto3

        boto3.client("s3", region_name="us-east-1").create_bucket(Bucket="prunery-test")
        yield


def test_s3_backend_round_trip(s3, base_settings, tmp_path):
    from core.storage import S3Storage

    settings = base_settings.model_copy(
        update={
            "storage_backend": "s3",
            "s3_bucket": "prunery-test",
            "s3_prefix": "env1",
            "worker_cache_dir": tmp_path,
        }
    )
    store = S3Storage(settings)
    store.check()
    src = store.staging_dir() / "up.bin"
    src.write_bytes(b"hello" * 1000)
    store.put_file(src, "tenants/t/models/m.onnx")
    assert not src.exists()
    assert store.exists("tenants/t/models/m.onnx") and store.size("tenants/t/models/m.onnx") == 5000
    assert b"".join(store.open_chunks("tenants/t/models/m.onnx")) == b"hello" * 1000
    local = store.get_file("tenants/t/models/m.onnx", tmp_path / "cache" / "m.onnx")
    assert local.read_bytes() == b"hello" * 1000
    keys = [o["Key"] for o in store.client.list_objects_v2(Bucket="prunery-test")["Contents"]]
    assert keys == ["env1/tenants/t/models/m.onnx"]
    store.delete_prefix("tenants/t")
    assert not store.exists("tenants/t/models/m.onnx")


def test_api_with_s3_storage(s3, make_client, new_tenant, onnx_bytes, tmp_path):
    c = make_client(storage_backend="s3", s3_bucket="prunery-test", worker_cache_dir=tmp_path)
    h = new_tenant()["headers"]
    m = c.post("/v1/models", headers=h, files={"file": ("n.onnx", onnx_bytes)})
    d = c.post("/v1/datasets", headers=h, files={"file": ("d.npz", npz_bytes())})
    assert m.status_code == 201 and d.status_code == 201
    store = c.app.state.storage
    objects = [o["Key"] for o in store.client.list_objects_v2(Bucket="prunery-test")["Contents"]]
    assert any(k.endswith(f"models/{m.json()['id']}.onnx") for k in objects)
    assert any(k.endswith(f"datasets/{d.json()['id']}.npz") for k in objects)
    assert c.delete(f"/v1/models/{m.json()['id']}", headers=h).status_code == 204
    objects = [o["Key"] for o in store.client.list_objects_v2(Bucket="prunery-test")["Contents"]]
    assert not any(k.endswith(f"models/{m.json()['id']}.onnx") for k in objects)
    assert any(k.endswith(f"datasets/{d.json()['id']}.npz") for k in objects)
