"""The HTTP API: `create_app(settings)` builds a FastAPI app wired to one database, one
artifact store and one broker. Run it with `uvicorn app.main:app` (or `prunery serve`)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.routing import APIRoute

from app import openapi_extras
from app.abuse import BodyGuard, ConcurrencyCaps, RateLimits
from app.errors import document_errors, install_handlers
from app.features.analysis.router import router as analysis
from app.features.datasets.router import router as datasets
from app.features.health.router import router as health
from app.features.jobs.router import router as jobs
from app.features.methods.router import router as methods
from app.features.models.router import router as models
from app.features.webhooks.router import router as webhooks
from app.metrics import MetricsMiddleware
from core.broker import make_producer
from core.db import make_engine, make_sessionmaker
from core.settings import Settings, get_settings
from core.storage import make_storage

DESCRIPTION = """Prunery compresses neural networks: upload an ONNX model and a dataset,
submit a pruning job, and download a structurally pruned ONNX model with a report.

Every error has the shape `{"error": "<code>", "detail": "<what to fix>"}`.
Authenticate with `Authorization: Bearer <API key>`.

Job states: `queued → running → succeeded | failed | cancelled` (and `cancelling`). A job
that produced its model but missed a gate (e.g. `gates.max_accuracy_drop`) ends
`succeeded` with `gates_passed: false`.
"""


def _operation_id(route: APIRoute) -> str:
    tag = route.tags[0] if route.tags else "default"
    return f"{tag}-{route.name}"


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    engine = make_engine(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.dispose()

    app = FastAPI(
        title="Prunery",
        version="0.1.0",
        description=DESCRIPTION,
        generate_unique_id_function=_operation_id,
        lifespan=lifespan,
        docs_url=None,  # served from the package by app/openapi_extras.py (no CDN)
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessionmaker = make_sessionmaker(engine)
    app.state.storage = make_storage(settings)
    app.state.celery = make_producer(settings)
    app.state.rate_limits = RateLimits(settings)
    app.state.caps = ConcurrencyCaps(settings)

    install_handlers(app)
    document_errors(app)
    app.add_middleware(BodyGuard, idle_s=settings.upload_idle_timeout_s)
    app.add_middleware(MetricsMiddleware)
    for router in (models, datasets, jobs, methods, health, analysis, webhooks):
        app.include_router(router)
    openapi_extras.install(app)
    logging.getLogger("prunery").setLevel(logging.INFO)
    return app


_built: FastAPI | None = None


def __getattr__(name: str) -> FastAPI:
    # `uvicorn app.main:app` builds the app from the environment on first access.
    global _built
    if name == "app":
        if _built is None:
            _built = create_app()
        return _built
    raise AttributeError(name)
