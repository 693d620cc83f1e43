"""Webhook secret and delivery log: GET /v1/webhooks/secret, POST /v1/webhooks/secret/rotate,
GET /v1/jobs/{id}/webhooks. Deliveries themselves are sent by a worker (app/webhooks.py)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field
from sqlalchemy import select

from app.deps import PrincipalDep, SessionDep
from app.errors import NotFound, error_responses
from app.extra_models import WebhookDelivery
from app.models import Job
from app.webhooks import public, tenant_secret

router = APIRouter(tags=["webhooks"])


class WebhookSecretPublic(BaseModel):
    secret: str = Field(description="HMAC-SHA256 key of X-Prunery-Signature (prunery.webhooks.verify).")


class WebhookAttempt(BaseModel):
    at: str
    status_code: int | None = None
    error: str | None = None
    duration_ms: float | None = None
    refused: bool | None = None


class WebhookDeliveryPublic(BaseModel):
    id: str
    event: str
    url: str
    status: str = Field(description="pending | delivering | delivered | failed | refused")
    attempts: list[WebhookAttempt]
    created_at: datetime
    next_attempt_at: datetime | None
    finished_at: datetime | None
    payload_sha256: str


class WebhookDeliveriesPublic(BaseModel):
    data: list[WebhookDeliveryPublic]
    count: int


@router.get(
    "/v1/webhooks/secret",
    response_model=WebhookSecretPublic,
    summary="Your webhook signing secret (created on first use)",
    responses=error_responses(401, 429),
)
def get_secret(db: SessionDep, principal: PrincipalDep) -> Any:
    return WebhookSecretPublic(secret=tenant_secret(db, principal.tenant_id))


@router.post(
    "/v1/webhooks/secret/rotate",
    response_model=WebhookSecretPublic,
    summary="Replace the webhook signing secret; later deliveries use the new one",
    responses=error_responses(401, 429),
)
def rotate_secret(db: SessionDep, principal: PrincipalDep) -> Any:
    return WebhookSecretPublic(secret=tenant_secret(db, principal.tenant_id, rotate=True))


@router.get(
    "/v1/jobs/{job_id}/webhooks",
    response_model=WebhookDeliveriesPublic,
    summary="The job's webhook deliveries, each with every attempt",
    responses=error_responses(401, 404, 429),
)
def job_webhooks(job_id: str, db: SessionDep, principal: PrincipalDep) -> Any:
    job = db.get(Job, job_id)
    if job is None or job.tenant_id != principal.tenant_id:
        raise NotFound(f"no job {job_id!r}; list yours with GET /v1/jobs")
    rows = db.scalars(
        select(WebhookDelivery)
        .where(WebhookDelivery.job_id == job_id)
        .order_by(WebhookDelivery.created_at, WebhookDelivery.id)
    ).all()
    return WebhookDeliveriesPublic(data=[public(r) for r in rows], count=len(rows))
