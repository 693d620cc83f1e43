"""Datasets: .npz arrays or image-folder archives, validated from their headers the way the
worker will load them (the API never decodes one)."""

from __future__ import annotations

from typing import Any

from app.errors import Unprocessable, UnsupportedMediaType
from app.features.datasets.schemas import DatasetPublic, DatasetsPublic
from app.features.files import service as files
from app.features.files.multipart import Upload
from app.features.files.service import FileKind
from core.orm import DatasetFile, Job, new_id
from core.settings import Settings
from core.storage import dataset_key
from core.validation.dataset_checks import MAX_IMAGE_SIDE, Limits, inspect_dataset

SUFFIXES = (".tar.gz", ".tgz", ".npz", ".zip", ".tar")


def dataset_suffix(filename: str) -> str:
    lower = filename.lower()
    for suffix in SUFFIXES:
        if lower.endswith(suffix):
            return suffix
    raise UnsupportedMediaType(
        f"{filename!r}: upload an .npz (x_train, y_train, x_test, y_test) or a .zip/.tar/.tar.gz "
        "of train/<class>/*.png and test/<class>/*.png"
    )


def to_public(row: DatasetFile) -> DatasetPublic:
    return files.to_public(DatasetPublic, row, format=row.format)


def parse_fields(fields: dict[str, str]) -> dict[str, Any]:
    """The optional form fields: task, image_size ('H,W'), grayscale."""
    task = fields.get("task", "classification")
    if task not in ("classification", "language_modeling"):
        raise Unprocessable(f"task {task!r}: use 'classification' or 'language_modeling'")
    opts: dict[str, Any] = {"task": task}
    if fields.get("image_size"):
        raw = fields["image_size"].replace("x", ",").split(",")
        if len(raw) != 2 or not all(v.strip().isascii() and v.strip().isdigit() for v in raw):
            raise Unprocessable("image_size must be 'H,W', e.g. '32,32'")
        h, w = (int(v.strip()) if len(v.strip()) <= 6 else 10**9 for v in raw)
        if not (1 <= h <= MAX_IMAGE_SIDE and 1 <= w <= MAX_IMAGE_SIDE):
            raise Unprocessable(
                f"image_size {h},{w}: height and width must be between 1 and {MAX_IMAGE_SIDE}"
            )
        opts["image_size"] = (h, w)
    if fields.get("grayscale", "").lower() in ("1", "true", "yes"):
        opts["grayscale"] = True
    return opts


def upload_kind(settings: Settings) -> FileKind[DatasetFile]:
    limits = Limits(
        max_decoded_bytes=settings.max_dataset_decoded_bytes,
        max_image_pixels=settings.max_image_pixels,
    )

    def build(tenant_id: str, up: Upload) -> DatasetFile:
        opts = parse_fields(up.fields)
        suffix = dataset_suffix(up.filename)
        # Headers only (shapes × dtype, ratios, image sizes): the API never decodes a dataset;
        # the worker does, after the same checks. BadDataset → 422.
        ds = inspect_dataset(up.path, limits=limits, **opts)
        summary = {**ds.describe(), "task": opts["task"], "decoded_bytes": ds.decoded_bytes}
        if "image_size" in opts:
            summary["image_size"] = list(opts["image_size"])
        row_id = new_id("ds")
        return DatasetFile(
            id=row_id,
            tenant_id=tenant_id,
            filename=up.filename,
            format=suffix,
            sha256=up.sha256,
            size_bytes=up.size,
            summary=summary,
            storage_key=dataset_key(tenant_id, row_id, suffix),
        )

    return FileKind(
        cls=DatasetFile,
        noun="dataset",
        max_bytes=settings.max_dataset_bytes,
        suffix_for=dataset_suffix,
        build=build,
    )


RESOURCE = files.FileResource(
    cls=DatasetFile,
    noun="dataset",
    public=DatasetPublic,
    listing=DatasetsPublic,
    render=to_public,
    uses=lambda row: (Job.dataset_id == row.id) | (Job.eval_dataset_id == row.id),
)
