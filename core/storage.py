"""Artifact storage: a local directory (default) or an S3-compatible bucket.

Writes are atomic: a local file is written under a temporary name in the same directory and
renamed into place; an S3 object only becomes visible when its upload completes. Readers
therefore never see half-written files. Keys are relative POSIX paths such as
`tenants/ten_1/models/mdl_2.onnx`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Protocol

from core.settings import Settings

CHUNK = 1024 * 1024


def _check_key(key: str) -> str:
    p = PurePosixPath(key)
    if p.is_absolute() or ".." in p.parts or not key:
        raise ValueError(f"unsafe storage key {key!r}")
    return key


class Storage(Protocol):
    def staging_dir(self) -> Path:
        """A local directory for uploads in flight (same filesystem as the store if local)."""

    def put_file(self, src: Path, key: str) -> None:
        """Atomically store the local file `src` (moved or copied) under `key`."""

    def get_file(self, key: str, dest: Path) -> Path:
        """A local path with the object's bytes (`dest` unless the store is local)."""

    def open_chunks(self, key: str) -> Iterator[bytes]: ...

    def size(self, key: str) -> int: ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None: ...

    def delete_prefix(self, prefix: str) -> None: ...

    def check(self) -> None:
        """Raise if the store cannot be used (readiness)."""


class LocalStorage:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / ".staging").mkdir(exist_ok=True)

    def path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def staging_dir(self) -> Path:
        return self.root / ".staging"

    def put_file(self, src: Path, key: str) -> None:
        dest = self.path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        os.close(fd)
        try:
            try:
                os.replace(src, tmp)  # same filesystem: a rename, no copy
            except OSError:
                shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get_file(self, key: str, dest: Path) -> Path:
        path = self.path(key)
        if not path.is_file():
            raise FileNotFoundError(key)
        return path

    def open_chunks(self, key: str) -> Iterator[bytes]:
        with open(self.path(key), "rb") as fh:
            while chunk := fh.read(CHUNK):
                yield chunk

    def size(self, key: str) -> int:
        return self.path(key).stat().st_size

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self.path(prefix.rstrip("/")), ignore_errors=True)

    def check(self) -> None:
        probe = self.staging_dir() / ".ready"
        probe.write_bytes(b"ok")
        probe.unlink()


class S3Storage:
    """S3-compatible (AWS, MinIO, ...). Uploads are staged on local disk first, because the
    API validates every upload before it is stored."""

    def __init__(self, settings: Settings) -> None:
        import boto3

        if not settings.s3_bucket:
            raise ValueError("PRUNERY_S3_BUCKET is required for the s3 storage backend")
        self.bucket = settings.s3_bucket
        self.prefix = settings.s3_prefix.strip("/")
        self.client = boto3.client(
            "s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.s3_region
        )
        self._staging = Path(settings.worker_cache_dir) / ".staging"
        self._staging.mkdir(parents=True, exist_ok=True)

    def _key(self, key: str) -> str:
        key = _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def staging_dir(self) -> Path:
        return self._staging

    def put_file(self, src: Path, key: str) -> None:
        # A (multipart) upload becomes visible only once complete: atomic for readers.
        self.client.upload_file(str(src), self.bucket, self._key(key))
        Path(src).unlink(missing_ok=True)

    def get_file(self, key: str, dest: Path) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        os.close(fd)
        try:
            self.client.download_file(self.bucket, self._key(key), tmp)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return dest

    def open_chunks(self, key: str) -> Iterator[bytes]:
        body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        try:
            while chunk := body.read(CHUNK):
                yield chunk
        finally:
            body.close()

    def size(self, key: str) -> int:
        head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        return int(head["ContentLength"])

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError:
            return False
        return True

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def delete_prefix(self, prefix: str) -> None:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(
            Bucket=self.bucket, Prefix=self._key(prefix.rstrip("/")) + "/"
        ):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys})

    def check(self) -> None:
        self.client.head_bucket(Bucket=self.bucket)


def make_storage(settings: Settings) -> Storage:
    if settings.storage_backend == "s3":
        return S3Storage(settings)
    return LocalStorage(settings.storage_dir)


# Key layout, in one place.
def model_key(tenant_id: str, model_id: str) -> str:
    return f"tenants/{tenant_id}/models/{model_id}.onnx"


def dataset_key(tenant_id: str, dataset_id: str, suffix: str) -> str:
    return f"tenants/{tenant_id}/datasets/{dataset_id}{suffix}"


def job_prefix(tenant_id: str, job_id: str) -> str:
    return f"tenants/{tenant_id}/jobs/{job_id}"
