"""Webhook secret and delivery log: GET /v1/webhooks/secret, POST /v1/webhooks/secret/rotate,
GET /v1/jobs/{id}/webhooks. Its own feature: the secret is a tenant-wide resource."""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import PrincipalDep, SessionDep
from app.errors import error_responses
from app.features.webhooks import service
from app.features.webhooks.schemas import WebhookDeliveriesPublic, WebhookSecretPublic

router = APIRouter(tags=["webhooks"])


@router.get(
    "/v1/webhooks/secret",
    response_model=WebhookSecretPublic,
    summary="Your webhook signing secret (created on first use)",
    responses=error_responses(401, 429),
)
def get_secret(db: SessionDep, principal: PrincipalDep) -> WebhookSecretPublic:
    return service.secret(db, principal.tenant_id)


@router.post(
    "/v1/webhooks/secret/rotate",
    response_model=WebhookSecretPublic,
    summary="Replace the webhook signing secret; later deliveries use the new one",
    responses=error_responses(401, 429),
)
def rotate_secret(db: SessionDep, principal: PrincipalDep) -> WebhookSecretPublic:
    return service.secret(db, principal.tenant_id, rotate=True)


@router.get(
    "/v1/jobs/{job_id}/webhooks",
    response_model=WebhookDeliveriesPublic,
    summary="The job's webhook deliveries, each with every attempt",
    responses=error_responses(401, 404, 429),
)
def job_webhooks(job_id: str, db: SessionDep, principal: PrincipalDep) -> WebhookDeliveriesPublic:
    return service.deliveries(db, principal.tenant_id, job_id)
