"""Verify Prunery webhook deliveries in your receiver.

    from prunery.webhooks import verify, InvalidSignature

    job = verify(request_body_bytes, request.headers["X-Prunery-Signature"], secret)

`secret` is your tenant's webhook secret (`client.webhooks.secret()` or
`GET /v1/webhooks/secret`). The header is `t=<unix seconds>,v1=<hex HMAC-SHA256(secret,
"<t>.<body>")>`; deliveries older than `tolerance_s` are refused (replay protection).
Always verify the raw bytes you received, before parsing them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

SIGNATURE_HEADER = "X-Prunery-Signature"


class InvalidSignature(ValueError):
    """The delivery is not from Prunery, was altered, or is too old."""


def compute_signature(secret: str, body: bytes, timestamp: int) -> str:
    return hmac.new(
        secret.encode(), f"{int(timestamp)}.".encode() + body, hashlib.sha256
    ).hexdigest()


def verify(
    body: bytes | str,
    header: str | None,
    secret: str,
    *,
    tolerance_s: float = 300.0,
    now: float | None = None,
) -> dict[str, Any]:
    """The delivered job JSON as a dict, or InvalidSignature saying what is wrong."""
    if isinstance(body, str):
        body = body.encode()
    if not header:
        raise InvalidSignature(f"no {SIGNATURE_HEADER} header")
    fields: dict[str, list[str]] = {}
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if sep:
            fields.setdefault(key, []).append(value)
    try:
        timestamp = int(fields["t"][0])
    except (KeyError, ValueError):
        raise InvalidSignature(f"malformed {SIGNATURE_HEADER}: no t=<unix seconds>") from None
    signatures = fields.get("v1", [])
    if not signatures:
        raise InvalidSignature(f"malformed {SIGNATURE_HEADER}: no v1=<signature>")
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        raise InvalidSignature(
            f"timestamp {timestamp} is {current - timestamp:.0f} s from now (tolerance {tolerance_s:.0f} s)"
        )
    expected = compute_signature(secret, body, timestamp)
    if not any(hmac.compare_digest(expected, s) for s in signatures):
        raise InvalidSignature("signature mismatch: wrong secret, or the body was altered")
    payload: dict[str, Any] = json.loads(body)
    return payload
