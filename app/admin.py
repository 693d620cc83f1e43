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

from sqlalchemy import select

from app.config import get_settings
from app.db import make_engine, make_sessionmaker, migrate, transaction
from app.models import ApiKey, JobEvent, Tenant, utcnow
from app.security import create_api_key, create_tenant


def main(argv: list[str] | None = None) -> int:
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
    args = parser.parse_args(argv)

    settings = get_settings()
    if args.cmd == "migrate":
        migrate(settings)
        print("database is at the latest revision")
        return 0
    factory = make_sessionmaker(make_engine(settings))
    with transaction(factory) as s:
        if args.cmd == "create-tenant":
            if s.scalar(select(Tenant).where(Tenant.name == args.name)):
                print(f"tenant {args.name!r} exists; use create-key", file=sys.stderr)
                return 2
            tenant = create_tenant(s, args.name)
            key_row, key = create_api_key(s, tenant, args.key_name)
            out = {
                "tenant_id": tenant.id,
                "tenant": tenant.name,
                "key_id": key_row.id,
                "api_key": key,
            }
        elif args.cmd == "create-key":
            tenant = s.scalar(
                select(Tenant).where((Tenant.name == args.tenant) | (Tenant.id == args.tenant))
            )
            if tenant is None:
                print(f"no tenant {args.tenant!r}", file=sys.stderr)
                return 2
            key_row, key = create_api_key(s, tenant, args.name)
            out = {"tenant_id": tenant.id, "key_id": key_row.id, "api_key": key}
        elif args.cmd == "revoke-key":
            row = s.get(ApiKey, args.key_id)
            if row is None:
                print(f"no key {args.key_id!r}", file=sys.stderr)
                return 2
            row.revoked_at = utcnow()
            out = {"key_id": row.id, "revoked": True}
        elif args.cmd == "job-debug":
            rows = s.scalars(
                select(JobEvent)
                .where(JobEvent.job_id == args.job_id, JobEvent.kind == "debug")
                .order_by(JobEvent.id)
            ).all()
            if not rows:
                print(f"no stored traceback for job {args.job_id!r}", file=sys.stderr)
                return 2
            if not args.json:
                for row in rows:
                    print(f"--- {row.at.isoformat()}\n{row.message}")
                return 0
            out = {"job_id": args.job_id, "tracebacks": [r.message for r in rows]}
        else:
            tenants = s.scalars(select(Tenant).order_by(Tenant.created_at)).all()
            out = {"tenants": [{"id": t.id, "name": t.name} for t in tenants]}
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
