"""The Prunery client (httpx + pydantic only).

    from prunery import Client
    client = Client()                       # PRUNERY_URL / PRUNERY_API_KEY, or `prunery serve`'s credentials
    model = client.models.upload("net.onnx")
    data = client.datasets.upload("digits.npz")
    job = client.jobs.create({"model_id": model.id, "dataset_id": data.id,
                              "method": {"name": "l1_norm"}, "target": {"flops": 0.5}})
    job.wait(progress=True)
    job.download("out/")

Modules: `calls` (every request, built once), `_transport` (server config, the one retry
policy, errors), `resources` (the returned models), `sync` (Client, Job), `aio`
(AsyncClient, AsyncJob), `torch_export` (upload_torch's export; the one torch user).
Only idempotent calls are retried (GET, DELETE, cancel, uploads, and job creation, which
always sends an Idempotency-Key), on 429/503/504 and connection errors, with jittered
exponential backoff that honours Retry-After.
"""

from prunery.client._transport import (
    RETRY_STATUSES,
    RetryPolicy,
    credentials_path,
    load_credentials,
)
from prunery.client.aio import AsyncClient, AsyncJob
from prunery.client.resources import (
    Dataset,
    ErrorInfo,
    JobData,
    JobEvent,
    Method,
    Model,
    Page,
)
from prunery.client.sync import Client, Datasets, Job, Jobs, Methods, Models, Webhooks

__all__ = [
    "RETRY_STATUSES",
    "AsyncClient",
    "AsyncJob",
    "Client",
    "Dataset",
    "Datasets",
    "ErrorInfo",
    "Job",
    "JobData",
    "JobEvent",
    "Jobs",
    "Method",
    "Methods",
    "Model",
    "Models",
    "Page",
    "RetryPolicy",
    "Webhooks",
    "credentials_path",
    "load_credentials",
]
