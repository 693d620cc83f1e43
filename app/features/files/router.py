"""The read and delete routes every stored kind of file has: GET list, GET one, DELETE one.

Each is registered with its own name (the operation id), summary, response model and
error statuses, so the OpenAPI document reads as if every route were written by hand."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Path, Response
from pydantic import BaseModel

from app.deps import PrincipalDep, SessionDep, StorageDep
from app.errors import error_responses
from app.features.common import PageDep
from app.features.files.service import FileResource


def upload_responses(public: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """An upload route's documented responses: 200 with the row for bytes this tenant already
    sent, and every status the shared upload service refuses with."""
    return error_responses(
        400, 401, 408, 413, 415, 422, 429, ok={"model": public, "description": "Already uploaded"}
    )


def add_file_routes(router: APIRouter, resource: FileResource[Any, Any, Any]) -> None:
    """`GET ""`, `GET "/{<noun>_id}"` and `DELETE "/{<noun>_id}"` for `resource` on `router`
    (whose prefix is `/v1/<noun>s`)."""
    noun, plural = resource.noun, f"{resource.noun}s"
    param = f"{noun}_id"
    # The path parameter keeps its per-resource name ({model_id}, {dataset_id}).
    ident_path = Path(alias=param, title=param.replace("_", " ").title())

    def list_files(db: SessionDep, principal: PrincipalDep, window: PageDep) -> Any:
        return resource.list(db, principal.tenant_id, window)

    def get_file(db: SessionDep, principal: PrincipalDep, ident: str = ident_path) -> Any:
        return resource.render(resource.get(db, principal.tenant_id, ident))

    def delete_file(
        db: SessionDep, principal: PrincipalDep, storage: StorageDep, ident: str = ident_path
    ) -> Response:
        resource.delete(db, storage, principal.tenant_id, ident)
        return Response(status_code=204)

    router.add_api_route(
        "",
        list_files,
        methods=["GET"],
        name=f"list_{plural}",
        summary=f"List {plural.title()}",
        response_model=resource.listing,
        responses=error_responses(401, 422, 429),
    )
    router.add_api_route(
        f"/{{{param}}}",
        get_file,
        methods=["GET"],
        name=f"get_{noun}",
        summary=f"Get {noun.title()}",
        response_model=resource.public,
        responses=error_responses(401, 404, 429),
    )
    router.add_api_route(
        f"/{{{param}}}",
        delete_file,
        methods=["DELETE"],
        name=f"delete_{noun}",
        summary=f"Delete {noun.title()}",
        status_code=204,
        responses=error_responses(401, 404, 409, 429),
    )
