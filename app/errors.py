"""Errors carry their HTTP status; one handler renders one JSON shape everywhere:

    {"error": "<code>", "detail": "<what to fix>"}

The shape is `ErrorBody`, and every route documents the statuses it can answer with it.
"""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy.exc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import EngineError
from core.schemas import ErrorBody

log = logging.getLogger("prunery.api")


class ApiError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, detail: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.detail = detail
        if code:
            self.code = code
        self.headers = headers or {}


class BadRequest(ApiError):
    status, code = 400, "bad_request"


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"

    def __init__(self, detail: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(detail, code, {"WWW-Authenticate": "Bearer", **(headers or {})})


class NotFound(ApiError):
    status, code = 404, "not_found"


class RequestTimeout(ApiError):
    status, code = 408, "request_timeout"


class Conflict(ApiError):
    status, code = 409, "conflict"


class PayloadTooLarge(ApiError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(ApiError):
    status, code = 415, "unsupported_media_type"


class Unprocessable(ApiError):
    status, code = 422, "validation_error"


class TooManyRequests(ApiError):
    status, code = 429, "rate_limited"


class ServiceUnavailable(ApiError):
    status, code = 503, "unavailable"


_DESCRIPTIONS = {
    400: "Malformed request (bad JSON or multipart body).",
    401: "Missing, unknown or revoked API key.",
    404: "No such resource for this tenant.",
    408: "The client sent the request body too slowly or stopped sending it.",
    409: "The request conflicts with the resource's state.",
    413: "Upload larger than the server's limit.",
    415: "Wrong content type or file format.",
    422: "The request is well-formed but invalid; the detail says what to fix.",
    429: "Too many requests or too many active jobs; retry after Retry-After seconds.",
    503: "A dependency (database, broker, storage) is unavailable.",
}


def error_responses(
    *statuses: int, ok: dict[str, Any] | None = None
) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries documenting the error shape for these statuses (after the
    200 entry `ok`, when the success response needs describing)."""
    out: dict[int | str, dict[str, Any]] = {200: ok} if ok is not None else {}
    out.update({s: {"model": ErrorBody, "description": _DESCRIPTIONS[s]} for s in statuses})
    return out


def _render(
    status: int, code: str, detail: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        status_code=status, content={"error": code, "detail": detail}, headers=headers or None
    )


def _validation_detail(exc: RequestValidationError) -> tuple[int, str, str]:
    problems = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            return (
                400,
                "bad_json",
                f"the request body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}",
            )
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        problems.append(f"{'.'.join(loc) or 'body'}: {err.get('msg')}")
    return 422, "validation_error", "; ".join(problems) or "invalid request"


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return _render(exc.status, exc.code, exc.detail, exc.headers)

    @app.exception_handler(EngineError)
    async def _engine_error(_request: Request, exc: EngineError) -> JSONResponse:
        return _render(422, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        status, code, detail = _validation_detail(exc)
        return _render(status, code, detail)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {
            404: "not_found",
            405: "method_not_allowed",
            400: "bad_request",
            408: "request_timeout",
            413: "payload_too_large",
        }
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            detail = "no such endpoint; see /docs for the API"
        return _render(
            exc.status_code,
            codes.get(exc.status_code, "http_error"),
            detail,
            getattr(exc, "headers", None),
        )

    @app.exception_handler(sqlalchemy.exc.OperationalError)
    @app.exception_handler(sqlalchemy.exc.TimeoutError)
    async def _db_down(_request: Request, exc: Exception) -> JSONResponse:
        log.warning("database unavailable: %s", exc)
        return _render(
            503,
            "database_unavailable",
            "the database is unavailable; retry shortly",
            {"Retry-After": "5"},
        )

    @app.exception_handler(Exception)
    async def _unhandled(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _render(
            500, "internal_error", f"internal error ({type(exc).__name__}); it was logged"
        )


def document_errors(app: FastAPI) -> None:
    """Make OpenAPI say what the handlers send: every 422 is an `ErrorBody` (FastAPI would
    otherwise document its own `HTTPValidationError`, which this API never returns), and every
    operation documents 429 (rate limits) and 503 (a dependency is down)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.setdefault("ErrorBody", ErrorBody.model_json_schema())
        ref = {"$ref": "#/components/schemas/ErrorBody"}
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                responses = operation.setdefault("responses", {})
                for status in ("422",) if "422" in responses else ():
                    responses[status] = {
                        "description": _DESCRIPTIONS[422],
                        "content": {"application/json": {"schema": ref}},
                    }
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
