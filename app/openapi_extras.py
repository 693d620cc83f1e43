"""What a newcomer meets first: `/docs` and `/openapi.json`.

* `/docs` serves Swagger UI from the `fastapi-swagger` package's assets (no CDN), so it works on a
  machine without internet access; ReDoc (CDN-only) is not offered.
* `/openapi.json` declares bearer authentication (`securitySchemes`), so Swagger UI shows an
  Authorize button and its "Try it out" calls carry the API key, and marks each operation
  that needs the key.
* The report endpoint's 200 response is the typed `Report` schema (not `{}`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles

from prunery.report import Report

SCHEME = "bearerAuth"
ASSETS = "/docs-assets"


def _needs_key(dependant: Dependant) -> bool:
    from app.deps import current_principal

    return any(d.call is current_principal or _needs_key(d) for d in dependant.dependencies)


def _api_routes(routes: list[Any]) -> list[APIRoute]:
    """Every APIRoute, also inside included routers (FastAPI keeps those wrapped)."""
    out: list[APIRoute] = []
    for route in routes:
        if isinstance(route, APIRoute):
            out.append(route)
        elif getattr(route, "original_router", None) is not None:
            out.extend(_api_routes(route.original_router.routes))
    return out


def install(app: FastAPI) -> None:
    """Call on an app created with docs_url=None and redoc_url=None."""
    import fastapi_swagger.resources as swagger_assets  # Swagger UI 5 (OpenAPI 3.1), MIT

    directory = Path(swagger_assets.__file__).parent
    app.mount(ASSETS, StaticFiles(directory=directory), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} — API docs",
            swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS}/favicon-32x32.png",
            oauth2_redirect_url="/docs/oauth2-redirect",
            swagger_ui_parameters={"persistAuthorization": True},
        )

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    def swagger_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    build = app.openapi  # what is installed already (app.errors.document_errors): extend it

    def openapi() -> dict[str, Any]:
        if app.openapi_schema and "securitySchemes" in app.openapi_schema.get("components", {}):
            return app.openapi_schema
        schema = build()
        components = schema.setdefault("components", {})
        components.setdefault("securitySchemes", {})[SCHEME] = {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key: `Authorization: Bearer pk_...` (`prunery serve` prints one; "
            "`python -m app.admin create-tenant NAME` makes one in a deployment).",
        }
        for route in _api_routes(app.routes):
            if not route.include_in_schema:
                continue
            if not _needs_key(route.dependant):
                continue
            for method in route.methods or ():
                op = schema["paths"].get(route.path_format, {}).get(method.lower())
                if op is not None:
                    op["security"] = [{SCHEME: []}]
        # The typed report (the route returns the stored JSON as is).
        report_defs = Report.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, definition in report_defs.pop("$defs", {}).items():
            components.setdefault("schemas", {}).setdefault(name, definition)
        components.setdefault("schemas", {})["Report"] = report_defs
        op = schema["paths"].get("/v1/jobs/{job_id}/report", {}).get("get")
        if op is not None:
            op["responses"]["200"] = {
                "description": "The report: every number the engine measured, and how.",
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Report"}}
                },
            }
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
