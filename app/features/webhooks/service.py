"""Webhook secrets and delivery logs (deliveries themselves are sent by a worker,
core/webhooks.py)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.features.jobs.service import get_job
from app.features.webhooks.schemas import (
    WebhookDeliveriesPublic,
    WebhookDeliveryPublic,
    WebhookSecretPublic,
)
from core.orm import WebhookDelivery
from core.webhooks import public, tenant_secret


def secret(db: Session, tenant_id: str, rotate: bool = False) -> WebhookSecretPublic:
    return WebhookSecretPublic(secret=tenant_secret(db, tenant_id, rotate=rotate))


def deliveries(db: Session, tenant_id: str, job_id: str) -> WebhookDeliveriesPublic:
    get_job(db, tenant_id, job_id)
    rows = db.scalars(
        select(WebhookDelivery)
        .where(WebhookDelivery.job_id == job_id)
        .order_by(WebhookDelivery.created_at, WebhookDelivery.id)
    ).all()
    data = [WebhookDeliveryPublic.model_validate(public(r)) for r in rows]
    return WebhookDeliveriesPublic(data=data, count=len(rows))
