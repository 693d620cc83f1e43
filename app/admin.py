"""Admin command: tenants and API keys (keys are printed once, stored hashed).

    python -m app.admin migrate
    python -m app.admin create-tenant acme            # prints the tenant id and a new key
    python -m app.admin create-key acme --name ci     # another key for that tenant
    python -m app.admin revoke-key key_0123abcd
    python -m app.admin list-tenants
    python -m app.admin job-debug job_0123abcd       # tracebacks of a job's internal errors

The database is PRUNERY_DATABASE_URL.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.security import create_api_key, create_tenant
from core.db import make_engine, make_sessionmaker, migrate, transaction
from core.orm import ApiKey, JobEvent, Tenant, utcnow
from core.settings import get_settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m app.admin",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("migrate", help="alembic upgrade head", parents=[common])
    p = sub.add_parser(
        "create-tenant", help="create a tenant and its first API key", parents=[common]
    )
    p.add_argument("name")
    p.add_argument("--key-name", default="default")
    p = sub.add_parser(
        "create-key", help="create another API key for a tenant (by name or id)", parents=[common]
    )
    p.add_argument("tenant")
    p.add_argument("--name", default="")
    p = sub.add_parser("revoke-key", help="revoke an API key by id", parents=[common])
    p.add_argument("key_id")
    sub.add_parser("list-tenants", parents=[common])
    p = sub.add_parser(
        "job-debug", help="print the stored tracebacks of a job's internal errors", parents=[common]
    )
    p.add_argument("job_id")
    return parser


# A command returns what to print, or an exit status after printing its own error.
Out = dict[str, Any]


def _refuse(message: str) -> int:
    print(message, file=sys.stderr)
    return 2


def _create_tenant(s: Session, args: argparse.Namespace) -> Out | int:
    if s.scalar(select(Tenant).where(Tenant.name == args.name)):
        return _refuse(f"tenant {args.name!r} exists; use create-key")
    tenant = create_tenant(s, args.name)
    key_row, key = create_api_key(s, tenant, args.key_name)
    return {"tenant_id": tenant.id, "tenant": tenant.name, "key_id": key_row.id, "api_key": key}


def _create_key(s: Session, args: argparse.Namespace) -> Out | int:
    tenant = s.scalar(
        select(Tenant).where((Tenant.name == args.tenant) | (Tenant.id == args.tenant))
    )
    if tenant is None:
        return _refuse(f"no tenant {args.tenant!r}")
    key_row, key = create_api_key(s, tenant, args.name)
    return {"tenant_id": tenant.id, "key_id": key_row.id, "api_key": key}


def _revoke_key(s: Session, args: argparse.Namespace) -> Out | int:
    row = s.get(ApiKey, args.key_id)
    if row is None:
        return _refuse(f"no key {args.key_id!r}")
    row.revoked_at = utcnow()
    return {"key_id": row.id, "revoked": True}


def _job_debug(s: Session, args: argparse.Namespace) -> Out | int:
    rows = s.scalars(
        select(JobEvent)
        .where(JobEvent.job_id == args.job_id, JobEvent.kind == "debug")
        .order_by(JobEvent.id)
    ).all()
    if not rows:
        return _refuse(f"no stored traceback for job {args.job_id!r}")
    if not args.json:
        for row in rows:
            print(f"--- {row.at.isoformat()}\n{row.message}")
        return 0
    return {"job_id": args.job_id, "tracebacks": [r.message for r in rows]}


def _list_tenants(s: Session, args: argparse.Namespace) -> Out | int:
    tenants = s.scalars(select(Tenant).order_by(Tenant.created_at)).all()
    return {"tenants": [{"id": t.id, "name": t.name} for t in tenants]}


COMMANDS: dict[str, Callable[[Session, argparse.Namespace], Out | int]] = {
    "create-tenant": _create_tenant,
    "create-key": _create_key,
    "revoke-key": _revoke_key,
    "job-debug": _job_debug,
    "list-tenants": _list_tenants,
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = get_settings()
    if args.cmd == "migrate":
        migrate(settings)
        print("database is at the latest revision")
        return 0
    factory = make_sessionmaker(make_engine(settings))
    with transaction(factory) as s:
        out = COMMANDS[args.cmd](s, args)
    if isinstance(out, int):
        return out
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k}: {v}")
        if "api_key" in out:
            print("(the key is shown only now; it is stored hashed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
