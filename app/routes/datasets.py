"""/v1/datasets: .npz arrays or image-folder archives, validated like the engine loads them."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.abuse import plausible_id
from app.deps import PrincipalDep, SessionDep, SessionFactoryDep, SettingsDep, StorageDep
from app.errors import Conflict, NotFound, Unprocessable, UnsupportedMediaType, error_responses
from app.metrics import UPLOAD_BYTES
from app.models import ACTIVE, DatasetFile, Job, new_id
from app.quotas import guarded_upload
from app.schemas import DatasetPublic, DatasetsPublic
from app.storage import Storage, dataset_key
from app.uploads import Upload
from workers.dataset_checks import MAX_IMAGE_SIDE, Limits, inspect_dataset

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

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
    s = row.summary
    return DatasetPublic(
        id=row.id,
        filename=row.filename,
        format=row.format,
        sha256=row.sha256,
        size_bytes=row.size_bytes,
        created_at=row.created_at,
        task=s["task"],
        train=s["train"],
        test=s["test"],
        sample_shape=s["sample_shape"],
        x_dtype=s["x_dtype"],
        num_classes=s["num_classes"],
        classes=s.get("classes"),
    )


def _find(session: Session, tenant_id: str, sha256: str) -> DatasetFile | None:
    return session.scalar(
        select(DatasetFile).where(DatasetFile.tenant_id == tenant_id, DatasetFile.sha256 == sha256)
    )


def _parse_fields(fields: dict[str, str]) -> dict:  # type: ignore[type-arg]
    task = fields.get("task", "classification")
    if task not in ("classification", "language_modeling"):
        raise Unprocessable(f"task {task!r}: use 'classification' or 'language_modeling'")
    opts: dict = {"task": task}  # type: ignore[type-arg]
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


def _store(  # type: ignore[no-untyped-def]
    factory, storage: Storage, tenant_id: str, up: Upload, limits: Limits
) -> tuple[DatasetFile, bool]:
    with factory() as session:
        existing = _find(session, tenant_id, up.sha256)
        if existing is not None:
            return existing, False
    opts = _parse_fields(up.fields)
    suffix = dataset_suffix(up.filename)
    # Headers only (shapes × dtype, ratios, image sizes): the API never decodes a dataset;
    # the worker does, after the same checks. BadDataset → 422.
    ds = inspect_dataset(up.path, limits=limits, **opts)
    summary = {**ds.describe(), "task": opts["task"], "decoded_bytes": ds.decoded_bytes}
    if "image_size" in opts:
        summary["image_size"] = list(opts["image_size"])
    row_id = new_id("ds")
    row = DatasetFile(
        id=row_id,
        tenant_id=tenant_id,
        filename=up.filename,
        format=suffix,
        sha256=up.sha256,
        size_bytes=up.size,
        summary=summary,
        storage_key=dataset_key(tenant_id, row_id, suffix),
    )
    with factory() as session:
        storage.put_file(up.path, row.storage_key)  # the file exists before the row commits
        session.add(row)
        try:
            session.commit()
        except IntegrityError:
            session.rollback()
            storage.delete(row.storage_key)
            existing = _find(session, tenant_id, up.sha256)
            assert existing is not None
            return existing, False
    return row, True


@router.post(
    "",
    status_code=201,
    response_model=DatasetPublic,
    summary="Upload a dataset (multipart field 'file'; optional fields task, image_size, grayscale)",
    description="201 for a new dataset; 200 with the existing one when this tenant already "
    "uploaded the same bytes.",
    responses={200: {"model": DatasetPublic, "description": "Already uploaded"}}
    | error_responses(400, 401, 408, 413, 415, 422, 429),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {
                            "file": {"type": "string", "format": "binary"},
                            "task": {
                                "type": "string",
                                "enum": ["classification", "language_modeling"],
                            },
                            "image_size": {"type": "string", "example": "32,32"},
                            "grayscale": {"type": "boolean"},
                        },
                    }
                }
            },
        }
    },
)
async def upload_dataset(
    request: Request,
    response: Response,
    principal: PrincipalDep,
    settings: SettingsDep,
    storage: StorageDep,
    factory: SessionFactoryDep,
) -> DatasetPublic:
    async with guarded_upload(
        request, principal.tenant_id, settings.max_dataset_bytes, dataset_suffix
    ) as up:
        UPLOAD_BYTES.labels(kind="dataset").inc(up.size)
        limits = Limits(
            max_decoded_bytes=settings.max_dataset_decoded_bytes,
            max_image_pixels=settings.max_image_pixels,
        )
        row, created = await run_in_threadpool(
            _store, factory, storage, principal.tenant_id, up, limits
        )
    response.status_code = 201 if created else 200
    response.headers["Location"] = f"/v1/datasets/{row.id}"
    return to_public(row)


@router.get("", response_model=DatasetsPublic, responses=error_responses(401, 422, 429))
def list_datasets(
    db: SessionDep,
    principal: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
) -> DatasetsPublic:
    where = DatasetFile.tenant_id == principal.tenant_id
    count = db.scalar(select(func.count()).select_from(DatasetFile).where(where)) or 0
    rows = db.scalars(
        select(DatasetFile)
        .where(where)
        .order_by(DatasetFile.created_at.desc(), DatasetFile.id)
        .limit(limit)
        .offset(offset)
    )
    return DatasetsPublic(data=[to_public(r) for r in rows], count=count)


def get_owned(db: Session, tenant_id: str, dataset_id: str) -> DatasetFile:
    row = db.get(DatasetFile, dataset_id) if plausible_id(dataset_id) else None
    if row is None or row.tenant_id != tenant_id:
        raise NotFound(f"no dataset {dataset_id!r}; list yours with GET /v1/datasets")
    return row


@router.get("/{dataset_id}", response_model=DatasetPublic, responses=error_responses(401, 404, 429))
def get_dataset(dataset_id: str, db: SessionDep, principal: PrincipalDep) -> DatasetPublic:
    return to_public(get_owned(db, principal.tenant_id, dataset_id))


@router.delete("/{dataset_id}", status_code=204, responses=error_responses(401, 404, 409, 429))
def delete_dataset(
    dataset_id: str, db: SessionDep, principal: PrincipalDep, storage: StorageDep
) -> Response:
    row = get_owned(db, principal.tenant_id, dataset_id)
    active = db.scalar(
        select(Job.id)
        .where((Job.dataset_id == row.id) | (Job.eval_dataset_id == row.id), Job.status.in_(ACTIVE))
        .limit(1)
    )
    if active:
        raise Conflict(f"job {active} still uses this dataset; cancel it or wait for it to finish")
    db.delete(row)
    db.flush()
    storage.delete(row.storage_key)
    return Response(status_code=204)
