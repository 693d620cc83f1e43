"""/v1/models: ONNX uploads (streamed, validated without torch, deduplicated by sha256)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.abuse import plausible_id
from app.config import Settings
from app.deps import PrincipalDep, SessionDep, SessionFactoryDep, SettingsDep, StorageDep
from app.errors import Conflict, NotFound, error_responses
from app.metrics import UPLOAD_BYTES
from app.models import ACTIVE, Job, ModelFile, new_id
from app.quotas import guarded_upload
from app.schemas import ModelPublic, ModelsPublic
from app.storage import Storage, model_key
from app.uploads import Upload
from workers.checks import inspect_model

router = APIRouter(prefix="/v1/models", tags=["models"])


def to_public(row: ModelFile) -> ModelPublic:
    s = row.summary
    return ModelPublic(
        id=row.id,
        filename=row.filename,
        sha256=row.sha256,
        size_bytes=row.size_bytes,
        created_at=row.created_at,
        opset=s["opset"],
        inputs=s["inputs"],
        outputs=s["outputs"],
        op_histogram=s["op_histogram"],
        parameter_count=s["parameter_count"],
        producer=s.get("producer", ""),
    )


def _find(session: Session, tenant_id: str, sha256: str) -> ModelFile | None:
    return session.scalar(
        select(ModelFile).where(ModelFile.tenant_id == tenant_id, ModelFile.sha256 == sha256)
    )


def _store(
    factory, storage: Storage, settings: Settings, tenant_id: str, up: Upload
) -> tuple[ModelFile, bool]:  # type: ignore[no-untyped-def]
    with factory() as session:
        existing = _find(session, tenant_id, up.sha256)
        if existing is not None:
            return existing, False
    summary = inspect_model(up.path, max_bytes=settings.max_model_bytes)  # BadModel → 422
    row_id = new_id("mdl")
    row = ModelFile(
        id=row_id,
        tenant_id=tenant_id,
        filename=up.filename,
        sha256=up.sha256,
        size_bytes=up.size,
        summary=summary.as_dict(),
        storage_key=model_key(tenant_id, row_id),
    )
    with factory() as session:
        storage.put_file(up.path, row.storage_key)  # the file exists before the row commits
        session.add(row)
        try:
            session.commit()
        except IntegrityError:  # the same file raced in concurrently
            session.rollback()
            storage.delete(row.storage_key)
            existing = _find(session, tenant_id, up.sha256)
            assert existing is not None
            return existing, False
    return row, True


@router.post(
    "",
    status_code=201,
    response_model=ModelPublic,
    summary="Upload an ONNX model (multipart field 'file')",
    description="201 for a new model; 200 with the existing model when this tenant already "
    "uploaded the same bytes (sha256).",
    responses={200: {"model": ModelPublic, "description": "Already uploaded"}}
    | error_responses(400, 401, 408, 413, 415, 422, 429),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {"file": {"type": "string", "format": "binary"}},
                    }
                }
            },
        }
    },
)
async def upload_model(
    request: Request,
    response: Response,
    principal: PrincipalDep,
    settings: SettingsDep,
    storage: StorageDep,
    factory: SessionFactoryDep,
) -> ModelPublic:
    async with guarded_upload(
        request, principal.tenant_id, settings.max_model_bytes, lambda _n: ".onnx"
    ) as up:
        UPLOAD_BYTES.labels(kind="model").inc(up.size)
        row, created = await run_in_threadpool(
            _store, factory, storage, settings, principal.tenant_id, up
        )
    response.status_code = 201 if created else 200
    response.headers["Location"] = f"/v1/models/{row.id}"
    return to_public(row)


@router.get("", response_model=ModelsPublic, responses=error_responses(401, 422, 429))
def list_models(
    db: SessionDep,
    principal: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
) -> ModelsPublic:
    where = ModelFile.tenant_id == principal.tenant_id
    count = db.scalar(select(func.count()).select_from(ModelFile).where(where)) or 0
    rows = db.scalars(
        select(ModelFile)
        .where(where)
        .order_by(ModelFile.created_at.desc(), ModelFile.id)
        .limit(limit)
        .offset(offset)
    )
    return ModelsPublic(data=[to_public(r) for r in rows], count=count)


def get_owned(db: Session, tenant_id: str, model_id: str) -> ModelFile:
    row = db.get(ModelFile, model_id) if plausible_id(model_id) else None
    if row is None or row.tenant_id != tenant_id:
        raise NotFound(f"no model {model_id!r}; list yours with GET /v1/models")
    return row


@router.get("/{model_id}", response_model=ModelPublic, responses=error_responses(401, 404, 429))
def get_model(model_id: str, db: SessionDep, principal: PrincipalDep) -> ModelPublic:
    return to_public(get_owned(db, principal.tenant_id, model_id))


@router.delete("/{model_id}", status_code=204, responses=error_responses(401, 404, 409, 429))
def delete_model(
    model_id: str, db: SessionDep, principal: PrincipalDep, storage: StorageDep
) -> Response:
    row = get_owned(db, principal.tenant_id, model_id)
    active = db.scalar(
        select(Job.id).where(Job.model_id == row.id, Job.status.in_(ACTIVE)).limit(1)
    )
    if active:
        raise Conflict(f"job {active} still uses this model; cancel it or wait for it to finish")
    db.delete(row)
    db.flush()
    storage.delete(row.storage_key)
    return Response(status_code=204)
