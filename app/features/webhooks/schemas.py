"""The webhook family: the signing secret and the delivery log."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field


class WebhookSecretPublic(BaseModel):
    secret: str = Field(
        description="HMAC-SHA256 key of X-Prunery-Signature (prunery.webhooks.verify)."
    )


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
