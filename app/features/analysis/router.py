"""POST/GET /v1/models/{id}/analysis: what can be pruned, computed by a (cheap) worker job
before any pruning job is paid for. The result is `prunery.analysis.Analysis`.

Its own feature (not folded into models): it has its own table, schemas and worker task."""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import CeleryDep, PrincipalDep, SessionDep, SettingsDep
from app.errors import error_responses
from app.features.analysis import service
from app.features.analysis.schemas import AnalysisCreate, AnalysisPublic

router = APIRouter(tags=["models"])


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
    db: SessionDep,
    principal: PrincipalDep,
    settings: SettingsDep,
    celery: CeleryDep,
) -> AnalysisPublic:
    return service.create_analysis(
        db, celery, settings.job_queue, principal.tenant_id, model_id, body
    )


@router.get(
    "/v1/models/{model_id}/analysis",
    response_model=AnalysisPublic,
    summary="The model's latest analysis",
    responses=error_responses(401, 404, 429),
)
def get_analysis(model_id: str, db: SessionDep, principal: PrincipalDep) -> AnalysisPublic:
    return service.latest_analysis(db, principal.tenant_id, model_id)
