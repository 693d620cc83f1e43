"""Model analyses: a row per request, computed by a short worker job (load + analyse)."""

from __future__ import annotations

from celery import Celery
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.deps import after_commit
from app.errors import NotFound
from app.features.analysis.schemas import AnalysisCreate, AnalysisPublic
from app.features.common import get_owned, owned_input
from app.features.methods.service import validate_params
from core import broker
from core.orm import DatasetFile, ModelAnalysis, ModelFile
from core.schemas import ErrorBody
from prunery.analysis import Analysis

UPLOAD_MODEL = "upload it with POST /v1/models"


def to_public(row: ModelAnalysis) -> AnalysisPublic:
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


def create_analysis(
    db: Session, celery: Celery, queue: str, tenant_id: str, model_id: str, body: AnalysisCreate
) -> AnalysisPublic:
    """Store a queued analysis and publish its task once the transaction commits."""
    model = get_owned(db, ModelFile, tenant_id, model_id, "model", UPLOAD_MODEL)
    if body.dataset_id:
        owned_input(
            db, DatasetFile, tenant_id, body.dataset_id, "dataset_id",
            "upload it with POST /v1/datasets",
        )  # fmt: skip
    params = body.model_dump(mode="json", exclude={"spec"})
    if body.spec is not None:
        # An unknown method or bad method params is a 422 now, not a failed analysis later;
        # the stored spec has the method's defaults filled in (the worker estimates it).
        spec = body.spec.model_dump(mode="json")
        method = body.spec.method
        spec["method"]["params"] = validate_params(method.name, method.params).model_dump(
            mode="json"
        )
        params["spec"] = spec
    row = ModelAnalysis(
        tenant_id=tenant_id,
        model_id=model.id,
        dataset_id=body.dataset_id,
        params=params,
        status="queued",
    )
    db.add(row)
    db.flush()
    analysis_id = row.id

    def publish() -> None:
        celery.send_task(broker.ANALYZE, args=[analysis_id], queue=queue)

    after_commit(db, publish)
    return to_public(row)


def latest_analysis(db: Session, tenant_id: str, model_id: str) -> AnalysisPublic:
    get_owned(db, ModelFile, tenant_id, model_id, "model", UPLOAD_MODEL)
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
    return to_public(row)
