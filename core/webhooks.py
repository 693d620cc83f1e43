"""Webhooks: signed POSTs of the public job JSON when a job changes state (torch-free).

* **Outbox.** `record_state_change()` runs inside the transaction that changes the job's
  state and inserts a `webhook_deliveries` row with the exact payload. No HTTP call is ever
  made from the request path or from the engine; a worker task (`workers.webhook_tasks`,
  run by beat every `PRUNERY_WEBHOOK_SWEEP_INTERVAL_S`) delivers due rows, so a delivery
  exists if and only if the state change committed.
* **Signature.** `X-Prunery-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret,
  "<t>.<body>")>` with the tenant's secret (`GET /v1/webhooks/secret`), verified by
  `prunery.webhooks.verify`. A new `t` (and signature) per attempt.
* **Retries.** Any non-2xx answer, timeout or connection error is retried with exponential
  backoff (`BACKOFF_S` x 2^n, capped at `BACKOFF_MAX_S`) up to `MAX_ATTEMPTS`; every attempt
  is logged on the row (`GET /v1/jobs/{id}/webhooks`).
* **SSRF.** The URL's host is resolved and refused when any address is private, loopback,
  link-local, multicast, reserved or unspecified — at submit (422) and again before every
  attempt, and the connection goes to the address that was checked (no DNS rebinding).
  Development may allow networks explicitly (`PRUNERY_WEBHOOK_ALLOWED_NETWORKS=127.0.0.0/8`),
  which production refuses.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import socket
import time
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.orm import Session

from core.jobs.public import to_public
from core.orm import Job, WebhookDelivery, WebhookSecret, utcnow

SIGNATURE_HEADER = "X-Prunery-Signature"
EVENT_HEADER = "X-Prunery-Event"
DELIVERY_HEADER = "X-Prunery-Delivery"


class WebhookSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PRUNERY_WEBHOOK_", extra="ignore", populate_by_name=True
    )

    allowed_networks: str = Field(
        default="",
        description="Comma-separated CIDRs that may be called although private/loopback "
        "(development only, e.g. 127.0.0.0/8); refused in production.",
    )
    max_attempts: int = Field(default=6, ge=1, le=20)
    backoff_s: float = Field(
        default=5.0, gt=0, description="Delay before the 2nd attempt; doubles."
    )
    backoff_max_s: float = Field(default=600.0, gt=0)
    timeout_s: float = Field(default=10.0, gt=0, description="Per-attempt HTTP timeout.")
    sweep_interval_s: float = Field(
        default=5.0, gt=0, description="How often due deliveries are sent (a beat task)."
    )
    batch: int = Field(default=20, ge=1, description="Deliveries per sweep.")
    environment: str = Field(default="development", validation_alias="PRUNERY_ENVIRONMENT")

    @model_validator(mode="after")
    def _no_private_in_production(self) -> WebhookSettings:
        if self.environment == "production" and self.networks:
            raise ValueError(
                "PRUNERY_WEBHOOK_ALLOWED_NETWORKS is for development: production never calls "
                "private, loopback or link-local addresses"
            )
        return self

    @property
    def networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        out = []
        for part in self.allowed_networks.split(","):
            if part.strip():
                out.append(ipaddress.ip_network(part.strip(), strict=False))
        return out


def get_webhook_settings() -> WebhookSettings:
    return WebhookSettings()


class RefusedURL(ValueError):
    """The webhook URL may not be called (bad form, unresolvable, or a refused address)."""


def _refused_kind(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for attr, kind in (
        ("is_loopback", "loopback"),
        ("is_link_local", "link-local"),
        ("is_private", "private"),
        ("is_multicast", "multicast"),
        ("is_unspecified", "unspecified"),
        ("is_reserved", "reserved"),
    ):
        if getattr(ip, attr):
            return kind
    return None


def resolve_checked(url: str, settings: WebhookSettings) -> tuple[str, int, str]:
    """(host, port, the address to connect to) or RefusedURL saying why not."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RefusedURL(f"webhook.url must be an http:// or https:// URL with a host, not {url!r}")
    host = parts.hostname
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise RefusedURL(f"webhook.url has an invalid port: {url!r}") from None
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        raise RefusedURL(f"webhook host {host!r} does not resolve ({exc})") from None
    addresses = sorted({str(info[4][0]) for info in infos})
    if not addresses:
        raise RefusedURL(f"webhook host {host!r} has no address")
    allowed = settings.networks
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%")[0])
        kind = _refused_kind(ip)
        if kind and not any(ip in net for net in allowed if net.version == ip.version):
            raise RefusedURL(
                f"webhook host {host!r} resolves to {address}, a {kind} address; webhooks are only "
                "sent to public addresses (PRUNERY_WEBHOOK_ALLOWED_NETWORKS allows others in development)"
            )
    return host, port, addresses[0]


# ------------------------------------------------------------------ secrets and signatures


def tenant_secret(session: Session, tenant_id: str, rotate: bool = False) -> str:
    row = session.get(WebhookSecret, tenant_id)
    if row is None:
        row = WebhookSecret(tenant_id=tenant_id, secret="whsec_" + secrets.token_hex(24))
        session.add(row)
        session.flush()
    elif rotate:
        row.secret = "whsec_" + secrets.token_hex(24)
        row.created_at = utcnow()
    return row.secret


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    t = int(time.time()) if timestamp is None else int(timestamp)
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


# ------------------------------------------------------------------ the outbox


def record_state_change(session: Session, job: Job) -> WebhookDelivery | None:
    """Queue a delivery when the job's spec asks for this state (same transaction)."""
    hook = (job.spec or {}).get("webhook") if isinstance(job.spec, dict) else None
    if not hook or job.status not in hook.get("events", ()):
        return None

    if job.created_at is None or job.updated_at is None:
        session.flush()
    payload = to_public(job).model_dump_json()
    delivery = WebhookDelivery(
        job_id=job.id,
        tenant_id=job.tenant_id,
        event=job.status,
        url=hook["url"],
        status="pending",
        payload=payload,
        attempts=[],
        attempt_count=0,
        next_attempt_at=utcnow(),
    )
    session.add(delivery)
    return delivery


def backoff(settings: WebhookSettings, attempt: int) -> float:
    """Seconds before attempt `attempt + 1` (attempt counts from 1)."""
    return float(min(settings.backoff_max_s, settings.backoff_s * 2 ** (attempt - 1)))


def attempt_delivery(
    delivery: WebhookDelivery, secret: str, settings: WebhookSettings
) -> dict[str, Any]:
    """One POST (the caller records the outcome). Never raises for network problems."""
    import httpx

    started = time.monotonic()
    record: dict[str, Any] = {"at": utcnow().isoformat(), "status_code": None, "error": None}
    try:
        host, port, address = resolve_checked(delivery.url, settings)
    except RefusedURL as exc:
        record.update(error=str(exc), refused=True)
        return record
    parts = urlsplit(delivery.url)
    netloc_ip = f"[{address}]" if ":" in address else address
    pinned = parts._replace(netloc=f"{netloc_ip}:{port}").geturl()
    body = delivery.payload.encode()
    host_header = host if parts.port is None else f"{host}:{parts.port}"
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "prunery-webhooks/0.1",
        "Host": host_header,
        SIGNATURE_HEADER: sign(secret, body),
        EVENT_HEADER: delivery.event,
        DELIVERY_HEADER: delivery.id,
    }
    try:
        with httpx.Client(
            timeout=settings.timeout_s, follow_redirects=False, trust_env=False
        ) as client:
            request = client.build_request("POST", pinned, content=body, headers=headers)
            if parts.scheme == "https":  # verify the certificate of the name, not the address
                request.extensions["sni_hostname"] = host
            response = client.send(request)
        record["status_code"] = response.status_code
        if not 200 <= response.status_code < 300:
            record["error"] = f"HTTP {response.status_code}: {response.text[:200]}"
    except httpx.HTTPError as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"[:500]
    record["duration_ms"] = round((time.monotonic() - started) * 1000, 1)
    return record


def finish_attempt(
    delivery: WebhookDelivery, record: dict[str, Any], settings: WebhookSettings, now: datetime
) -> None:
    delivery.attempts = [*(delivery.attempts or []), record]
    delivery.attempt_count += 1
    if record.get("refused"):
        delivery.status, delivery.finished_at, delivery.next_attempt_at = "refused", now, None
    elif record["error"] is None:
        delivery.status, delivery.finished_at, delivery.next_attempt_at = "delivered", now, None
    elif delivery.attempt_count >= settings.max_attempts:
        delivery.status, delivery.finished_at, delivery.next_attempt_at = "failed", now, None
    else:
        delivery.status = "pending"
        delivery.next_attempt_at = now + timedelta(
            seconds=backoff(settings, delivery.attempt_count)
        )


def public(delivery: WebhookDelivery) -> dict[str, Any]:
    return {
        "id": delivery.id,
        "event": delivery.event,
        "url": delivery.url,
        "status": delivery.status,
        "attempts": delivery.attempts or [],
        "created_at": delivery.created_at,
        "next_attempt_at": delivery.next_attempt_at,
        "finished_at": delivery.finished_at,
        "payload_sha256": hashlib.sha256(delivery.payload.encode()).hexdigest(),
    }
