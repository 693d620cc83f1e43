"""POST/GET /v1/models/{id}/analysis: what can be pruned, computed by a (cheap) worker job
before any pruning job is paid for. The result is `prunery.analysis.Analysis`."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from app.deps import CeleryDep, PrincipalDep, SessionDep, SettingsDep, after_commit
from app.errors import ErrorBody, NotFound, Unprocessable, error_responses
from app.extra_models import ModelAnalysis
from app.models import DatasetFile, ModelFile
from prunery.analysis import Analysis

router = APIRouter(tags=["models"])

ANALYZE_TASK = "workers.side_tasks.analyze_model"


class AnalysisCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset_id: str | None = Field(
        default=None, description="Probe with this dataset's samples (else random inputs of the declared shape)."
    )
    task: Literal["classification", "language_modeling"] = "classification"
    round_to: int = Field(default=1, ge=1, le=256)


class AnalysisPublic(BaseModel):
    id: str
    model_id: str
    dataset_id: str | None
    status: Literal["queued", "running", "succeeded", "failed"]
    params: dict[str, Any]
    result: Analysis | None = None
    error: ErrorBody | None = None
    created_at: datetime
    finished_at: datetime | None = None


def _public(row: ModelAnalysis) -> AnalysisPublic:
    return AnalysisPublic(
        id=row.id,
        model_id=row.model_id,
        dataset_id=row.dataset_id,
        status=row.status,  # type: ignore[arg-type]
        params=row.params,
        result=Analysis.model_validate(row.result) if row.result else None,
        error=ErrorBody(error=row.error_code, detail=row.error_detail or row.error_code)
        if row.error_code
        else None,
        created_at=row.created_at,
        finished_at=row.finished_at,
    )


def _model(db: SessionDep, tenant_id: str, model_id: str) -> ModelFile:
    model = db.get(ModelFile, model_id)
    if model is None or model.tenant_id != tenant_id:
        raise NotFound(f"no model {model_id!r}; upload it with POST /v1/models")
    return model


@router.post(
    "/v1/models/{model_id}/analysis",
    status_code=202,
    response_model=AnalysisPublic,
    summary="Analyse a model: prunable groups, excluded layers, reachable budget, methods",
    description="Queues a short worker job (load + analyse, no training). Poll "
    "GET /v1/models/{model_id}/analysis until `status` is `succeeded` or `failed`.",
    responses=error_responses(401, 404, 422, 429),
)
def create_analysis(
    model_id: str,
    body: AnalysisCreate,
    request: Request,
    db: SessionDep,
    principal: PrincipalDep,
    settings: SettingsDep,
    celery: CeleryDep,
) -> AnalysisPublic:
    model = _model(db, principal.tenant_id, model_id)
    if body.dataset_id:
        ds = db.get(DatasetFile, body.dataset_id)
        if ds is None or ds.tenant_id != principal.tenant_id:
            raise Unprocessable(
                f"dataset_id {body.dataset_id!r} does not exist; upload it with POST /v1/datasets",
                code="unknown_dataset",
            )
    row = ModelAnalysis(
        tenant_id=principal.tenant_id,
        model_id=model.id,
        dataset_id=body.dataset_id,
        params=body.model_dump(mode="json"),
        status="queued",
    )
    db.add(row)
    db.flush()
    analysis_id = row.id

    def publish() -> None:
        celery.send_task(ANALYZE_TASK, args=[analysis_id], queue=settings.job_queue)

    after_commit(db, publish)
    return _public(row)


@router.get(
    "/v1/models/{model_id}/analysis",
    response_model=AnalysisPublic,
    summary="The model's latest analysis",
    responses=error_responses(401, 404, 429),
)
def get_analysis(model_id: str, db: SessionDep, principal: PrincipalDep) -> AnalysisPublic:
    _model(db, principal.tenant_id, model_id)
    row = db.scalars(
        select(ModelAnalysis)
        .where(ModelAnalysis.model_id == model_id)
        .order_by(ModelAnalysis.created_at.desc(), ModelAnalysis.id.desc())
        .limit(1)
    ).first()
    if row is None:
        raise NotFound(
            f"model {model_id} has no analysis yet; ask for one with POST /v1/models/{model_id}/analysis"
        )
    return _public(row)
