"""The one upload service for models and datasets: stream the body to staging (app.quotas),
validate it without torch, store it deduplicated by sha256, render it, refuse deletes while a
job uses it.

A resource describes itself with a `FileKind`; everything else is shared."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel
from sqlalchemy import ColumnElement, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from app.deps import PrincipalDep, SessionFactoryDep, SettingsDep, StorageDep
from app.errors import Conflict
from app.features.common import Page, fetch_page, get_owned
from app.features.files.multipart import Upload
from app.metrics import UPLOAD_BYTES
from app.quotas import guarded_upload
from core.orm import DatasetFile, Job, ModelFile
from core.settings import Settings
from core.storage import Storage
from prunery.types import ACTIVE

File = TypeVar("File", ModelFile, DatasetFile)
Public = TypeVar("Public", bound=BaseModel)
Listing = TypeVar("Listing", bound=BaseModel)


@dataclass(frozen=True)
class FileKind(Generic[File]):
    """What differs between models and datasets."""

    cls: type[File]
    noun: str  # "model" | "dataset": metric label and messages
    max_bytes: int
    suffix_for: Callable[[str], str]  # the staged file's suffix (may refuse the name: 415)
    # Validate the staged upload (422 when it is not a usable file) and build the unsaved
    # row for this tenant.
    build: Callable[[str, Upload], File]


def find_by_sha(session: Session, cls: type[File], tenant_id: str, sha256: str) -> File | None:
    return session.scalar(select(cls).where(cls.tenant_id == tenant_id, cls.sha256 == sha256))


def store(
    factory: sessionmaker[Session],
    storage: Storage,
    kind: FileKind[File],
    tenant_id: str,
    up: Upload,
) -> tuple[File, bool]:
    """(row, created): the tenant's existing row for these bytes, or a new stored one."""
    with factory() as session:
        existing = find_by_sha(session, kind.cls, tenant_id, up.sha256)
        if existing is not None:
            return existing, False
    row = kind.build(tenant_id, up)
    with factory() as session:
        storage.put_file(up.path, row.storage_key)  # the file exists before the row commits
        session.add(row)
        try:
            session.commit()
        except IntegrityError:  # the same file raced in concurrently
            session.rollback()
            storage.delete(row.storage_key)
            existing = find_by_sha(session, kind.cls, tenant_id, up.sha256)
            assert existing is not None
            return existing, False
    return row, True


@dataclass(frozen=True)
class Uploader:
    """What an upload needs from the request; a route only says which kind of file."""

    request: Request
    tenant_id: str
    settings: Settings
    storage: Storage
    factory: sessionmaker[Session]

    async def receive(self, kind: FileKind[File], response: Response, prefix: str) -> File:
        """Stream the upload (quotas, size, timeouts), validate and store it off the loop;
        201 for new bytes, 200 with the existing row for bytes this tenant already sent."""
        async with guarded_upload(
            self.request, self.tenant_id, kind.max_bytes, kind.suffix_for
        ) as up:
            UPLOAD_BYTES.labels(kind=kind.noun).inc(up.size)
            row, created = await run_in_threadpool(
                store, self.factory, self.storage, kind, self.tenant_id, up
            )
        response.status_code = 201 if created else 200
        response.headers["Location"] = f"{prefix}/{row.id}"
        return row


def get_uploader(
    request: Request,
    principal: PrincipalDep,
    settings: SettingsDep,
    storage: StorageDep,
    factory: SessionFactoryDep,
) -> Uploader:
    return Uploader(request, principal.tenant_id, settings, storage, factory)


UploaderDep = Annotated[Uploader, Depends(get_uploader)]


def to_public(schema: type[Public], row: File, **columns: Any) -> Public:
    """The stored summary (what validation found) with the row's own columns on top."""
    return schema.model_validate(
        {
            **row.summary,
            "id": row.id,
            "filename": row.filename,
            "sha256": row.sha256,
            "size_bytes": row.size_bytes,
            "created_at": row.created_at,
            **columns,
        }
    )


def list_files(
    db: Session, cls: type[File], tenant_id: str, window: Page
) -> tuple[list[File], int]:
    """The tenant's files, newest first, and their total count."""
    order = [cls.created_at.desc(), cls.id]
    return fetch_page(db, cls, [cls.tenant_id == tenant_id], order, window)


def get_file(db: Session, cls: type[File], tenant_id: str, ident: str, noun: str) -> File:
    return get_owned(db, cls, tenant_id, ident, noun, f"list yours with GET /v1/{noun}s")


@dataclass(frozen=True)
class FileResource(Generic[File, Public, Listing]):
    """A stored kind of file as the HTTP API reads it: list, get and delete for a tenant."""

    cls: type[File]
    noun: str  # "model" | "dataset": path, messages
    public: type[Public]  # one file
    listing: type[Listing]  # {data: [Public], count}
    render: Callable[[File], Public]
    uses: Callable[[File], ColumnElement[bool]]  # which jobs still use a row

    def list(self, db: Session, tenant_id: str, window: Page) -> Listing:
        rows, count = list_files(db, self.cls, tenant_id, window)
        return self.listing(data=[self.render(r) for r in rows], count=count)

    def get(self, db: Session, tenant_id: str, ident: str) -> File:
        return get_file(db, self.cls, tenant_id, ident, self.noun)

    def delete(self, db: Session, storage: Storage, tenant_id: str, ident: str) -> None:
        row = self.get(db, tenant_id, ident)
        delete_unless_used(db, storage, row, self.uses(row), self.noun)


def delete_unless_used(
    db: Session, storage: Storage, row: File, uses: ColumnElement[bool], noun: str
) -> None:
    """Delete the row and its file, or 409 naming the active job that still uses it."""
    active = db.scalar(select(Job.id).where(uses, Job.status.in_(ACTIVE)).limit(1))
    if active:
        raise Conflict(f"job {active} still uses this {noun}; cancel it or wait for it to finish")
    db.delete(row)
    db.flush()
    storage.delete(row.storage_key)
