"""What every resource shares: tenant-owned lookups (404/422 naming the fix) and pages."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Query
from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from app.abuse import plausible_id
from app.errors import NotFound, Unprocessable

Row = TypeVar("Row")

Limit = Annotated[int, Query(ge=1, le=200)]
Offset = Annotated[int, Query(ge=0, le=1_000_000_000)]


@dataclass(frozen=True)
class Page:
    """`?limit=&offset=` of every list endpoint."""

    limit: Limit = 50
    offset: Offset = 0


PageDep = Annotated[Page, Depends()]


def find_owned(db: Session, cls: type[Row], tenant_id: str, ident: str) -> Row | None:
    """The tenant's row with this id, or None (another tenant's row is as absent as none)."""
    row = db.get(cls, ident) if plausible_id(ident) else None
    if row is None or getattr(row, "tenant_id") != tenant_id:  # noqa: B009
        return None
    return row


def get_owned(db: Session, cls: type[Row], tenant_id: str, ident: str, noun: str, hint: str) -> Row:
    """The row, or 404 "no <noun> '<id>'; <hint>" (a path parameter that names nothing)."""
    row = find_owned(db, cls, tenant_id, ident)
    if row is None:
        raise NotFound(f"no {noun} {ident!r}; {hint}")
    return row


def owned_input(
    db: Session, cls: type[Row], tenant_id: str, ident: str, field: str, hint: str
) -> Row:
    """The row a request body names, or 422 unknown_<noun> (the body is wrong, not the URL)."""
    row = find_owned(db, cls, tenant_id, ident)
    if row is None:
        raise Unprocessable(
            f"{field} {ident!r} does not exist; {hint}", code=f"unknown_{field.split('_')[0]}"
        )
    return row


def fetch_page(
    db: Session,
    cls: type[Row],
    where: list[ColumnElement[bool]],
    order_by: list[Any],
    window: Page,
) -> tuple[list[Row], int]:
    """One page of rows and the total count matching `where`."""
    count = db.scalar(select(func.count()).select_from(cls).where(*where)) or 0
    query = select(cls).where(*where).order_by(*order_by)
    rows = db.scalars(query.limit(window.limit).offset(window.offset))
    return list(rows), count
