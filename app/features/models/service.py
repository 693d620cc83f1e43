"""Models: ONNX files checked without torch (core.validation.onnx_checks), stored once per
tenant and sha256. A .zip of an .onnx and its external-data file(s) is stored as the one
self-contained .onnx it makes (core.validation.onnx_bundle)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from app.features.files import service as files
from app.features.files.multipart import Upload
from app.features.files.service import FileKind
from app.features.models.schemas import ModelPublic, ModelsPublic
from core.orm import Job, ModelFile, new_id
from core.settings import Settings
from core.storage import model_key
from core.validation.onnx_bundle import embed_bundle, is_zip
from core.validation.onnx_checks import inspect_model


def to_public(row: ModelFile) -> ModelPublic:
    return files.to_public(ModelPublic, row)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _embed(up: Upload, max_bytes: int) -> None:
    """Replace the staged .zip by the self-contained .onnx it makes: what is stored, hashed
    (so the model's sha256 is the stored file's, as in the job report) and deduplicated is that
    file; the name becomes the .onnx member's."""
    out = up.workdir / "embedded.onnx"
    name = embed_bundle(up.path, out, max_bytes=max_bytes)
    up.path.unlink()
    up.path, up.filename = out, name
    up.sha256, up.size = _sha256(out), out.stat().st_size


def upload_kind(settings: Settings) -> FileKind[ModelFile]:
    def build(tenant_id: str, up: Upload) -> ModelFile:
        if is_zip(up.path):
            _embed(up, settings.max_model_bytes)  # BadModel → 422
        summary = inspect_model(up.path, max_bytes=settings.max_model_bytes)  # BadModel → 422
        row_id = new_id("mdl")
        return ModelFile(
            id=row_id,
            tenant_id=tenant_id,
            filename=up.filename,
            sha256=up.sha256,
            size_bytes=up.size,
            summary=summary.as_dict(),
            storage_key=model_key(tenant_id, row_id),
        )

    return FileKind(
        cls=ModelFile,
        noun="model",
        max_bytes=settings.max_model_bytes,
        suffix_for=lambda name: ".zip" if name.lower().endswith(".zip") else ".onnx",
        build=build,
    )


RESOURCE = files.FileResource(
    cls=ModelFile,
    noun="model",
    public=ModelPublic,
    listing=ModelsPublic,
    render=to_public,
    uses=lambda row: Job.model_id == row.id,
)
