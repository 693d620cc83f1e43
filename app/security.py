"""API keys: random, shown once, stored only as sha256.

A key is `pk_<8 hex prefix>_<43 url-safe chars>` (256 bits of randomness); with that much
entropy a fast hash is safe for storage and lets us look keys up by hash in one index probe.
"""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.orm import ApiKey, Tenant


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> tuple[str, str]:
    """(full key, display prefix)."""
    prefix = secrets.token_hex(4)
    return f"pk_{prefix}_{secrets.token_urlsafe(32)}", prefix


def create_tenant(session: Session, name: str) -> Tenant:
    tenant = Tenant(name=name)
    session.add(tenant)
    session.flush()
    return tenant


def create_api_key(session: Session, tenant: Tenant, name: str = "") -> tuple[ApiKey, str]:
    key, prefix = generate_key()
    row = ApiKey(tenant_id=tenant.id, name=name, key_hash=hash_key(key), prefix=prefix)
    session.add(row)
    session.flush()
    return row, key


def get_or_create_tenant(session: Session, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    return tenant or create_tenant(session, name)


def lookup_key(session: Session, key: str) -> ApiKey | None:
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
    if row is None or row.revoked_at is not None:
        return None
    return row
