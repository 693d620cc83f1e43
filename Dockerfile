# syntax=docker/dockerfile:1.7
# Multi-stage build:
#   docker build --target api    -t prunery-api .     # slim: FastAPI + onnx checks, no torch
#   docker build --target worker -t prunery-worker .  # Celery worker with torch (CUDA wheels)

ARG PYTHON_VERSION=3.11

# ---------------------------------------------------------------- build: one wheel
FROM python:${PYTHON_VERSION}-slim AS build
WORKDIR /src
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml ./
COPY app ./app
COPY core ./core
COPY worker ./worker
COPY engine ./engine
COPY methods ./methods
COPY server_cli ./server_cli
COPY sdk ./sdk
COPY migrations ./migrations
RUN pip wheel --no-deps --wheel-dir /wheels ./sdk .

# ---------------------------------------------------------------- shared runtime base
FROM python:${PYTHON_VERSION}-slim AS runtime
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PRUNERY_STORAGE_DIR=/data/artifacts PRUNERY_WORKER_CACHE_DIR=/data/cache
RUN groupadd --system prunery && useradd --system --gid prunery --home /srv prunery \
    && mkdir -p /data/artifacts /data/cache && chown -R prunery:prunery /data
WORKDIR /srv

# ---------------------------------------------------------------- api: no torch
FROM runtime AS api
COPY --from=build /wheels /wheels
RUN pip install "$(ls /wheels/prunery-*.whl)" "$(ls /wheels/prunery_server-*.whl)[api]" && rm -rf /wheels \
    && python -c "import app.main, sys; assert 'torch' not in sys.modules"
USER prunery
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --retries=5 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=3)"
# Trusted proxies come from $FORWARDED_ALLOW_IPS (uvicorn's default source; 127.0.0.1 if unset).
CMD ["uvicorn", "app.main:app", "--host", "0.0.0.0", "--port", "8000", "--proxy-headers", "--timeout-keep-alive", "5"]

# ---------------------------------------------------------------- worker: torch + CUDA
FROM runtime AS worker
# CUDA builds of torch/torchvision; the engine picks the GPU when one is visible.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu126
COPY --from=build /wheels /wheels
RUN pip install --extra-index-url "${TORCH_INDEX}" "$(ls /wheels/prunery-*.whl)" "$(ls /wheels/prunery_server-*.whl)[worker]" \
    && rm -rf /wheels \
    && python -c "import importlib; from methods import catalog; \
[getattr(importlib.import_module(m.implementation.split(':')[0]), m.implementation.split(':')[1]) for m in catalog.list_methods()]"
USER prunery
# One process per GPU; scale out with more worker containers.
CMD ["celery", "-A", "worker.celery_app", "worker", "-Q", "gpu", "-c", "1", "--loglevel", "INFO"]
