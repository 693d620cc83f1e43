"""Every API request, built once (`Call`): the sync and the async client send the same
requests and read the same answers."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from prunery.analysis import Analysis
from prunery.client._transport import Call
from prunery.client.resources import Dataset, JobEvent, Method, Model
from prunery.report import Report
from prunery.spec import JobSpec

R = TypeVar("R", bound=BaseModel)

MODELS, DATASETS, JOBS = "/v1/models", "/v1/datasets", "/v1/jobs"


def _body(body: Any) -> Any:
    return body


def upload(path: str | os.PathLike[str], collection: str, fields: dict[str, Any]) -> Call[Any]:
    """Upload a file. Uploads are idempotent (deduplicated by sha256), so they may be retried."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(file)
    cls: type[BaseModel] = Dataset if collection == DATASETS else Model
    data = {k: str(v) for k, v in fields.items() if v is not None}
    return Call("POST", collection, cls.model_validate, idempotent=True, data=data, upload=file)


def dataset_fields(
    task: str | None, image_size: tuple[int, int] | None, grayscale: bool | None
) -> dict[str, Any]:
    fields: dict[str, Any] = {"task": task}
    if image_size:
        fields["image_size"] = f"{image_size[0]},{image_size[1]}"
    if grayscale is not None:
        fields["grayscale"] = str(grayscale).lower()
    return fields


def get(collection: str, ident: str, cls: type[R]) -> Call[R]:
    return Call("GET", f"{collection}/{ident}", cls.model_validate)


def list_page(collection: str, params: dict[str, Any]) -> Call[Any]:
    return Call("GET", collection, _body, params=params)


def delete(collection: str, ident: str) -> Call[None]:
    return Call("DELETE", f"{collection}/{ident}", lambda _body: None)


def list_jobs(status: str | list[str] | None, limit: int, offset: int) -> Call[Any]:
    params: dict[str, Any] = {"limit": limit, "offset": offset}
    if status:
        params["status"] = [status] if isinstance(status, str) else status
    return list_page(JOBS, params)


def create_job(spec: JobSpec | dict[str, Any], idempotency_key: str | None) -> Call[Any]:
    """An Idempotency-Key is always sent (a fresh one unless given), so a retried
    submission never creates a second job."""
    body = spec.model_dump(mode="json", exclude_none=True) if isinstance(spec, JobSpec) else spec
    headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
    return Call("POST", JOBS, _body, idempotent=True, json=body, headers=headers)


def get_job(job_id: str) -> Call[Any]:
    return Call("GET", f"{JOBS}/{job_id}", _body)


def cancel_job(job_id: str) -> Call[Any]:
    # Cancelling twice is harmless, so the call is retried like a GET.
    return Call("POST", f"{JOBS}/{job_id}/cancel", _body, idempotent=True)


def report(job_id: str) -> Call[Report]:
    return Call("GET", f"{JOBS}/{job_id}/report", Report.model_validate)


def report_html(job_id: str) -> Call[str]:
    return Call("GET", f"{JOBS}/{job_id}/report.html", lambda r: str(r.text), raw=True)


def webhooks(job_id: str) -> Call[list[dict[str, Any]]]:
    return Call("GET", f"{JOBS}/{job_id}/webhooks", lambda b: list(b["data"]))


def events(job_id: str, after: int) -> Call[list[JobEvent]]:
    return Call(
        "GET",
        f"{JOBS}/{job_id}/events",
        lambda b: [JobEvent.model_validate(e) for e in b],
        params={"after": after},
        headers={"Accept": "application/json"},
    )


def event_stream(job_id: str, after: int) -> Call[Any]:
    return Call(
        "GET",
        f"{JOBS}/{job_id}/events",
        _body,
        params={"after": after},
        headers={"Accept": "text/event-stream"},
    )


def artifact(job_id: str, name: str) -> Call[Any]:
    return Call("GET", f"{JOBS}/{job_id}/artifacts/{name}", _body)


def methods() -> Call[list[Method]]:
    return Call("GET", "/v1/methods", lambda b: [Method.model_validate(m) for m in b["data"]])


def create_analysis(
    model_id: str,
    dataset_id: str | None,
    task: str,
    round_to: int,
    spec: dict[str, Any] | None = None,
) -> Call[dict[str, Any]]:
    """`spec` (method, target, recovery, export) asks for a job-time estimate of that spec."""
    body: dict[str, Any] = {"dataset_id": dataset_id, "task": task, "round_to": round_to}
    if spec is not None:
        body["spec"] = spec
    return Call("POST", f"{MODELS}/{model_id}/analysis", dict, json=body)


def get_analysis(model_id: str) -> Call[dict[str, Any]]:
    return Call("GET", f"{MODELS}/{model_id}/analysis", dict)


def analysis_result(row: dict[str, Any]) -> Analysis:
    from prunery.analysis import AnalysisFailed

    if row["status"] != "succeeded":
        err = row.get("error") or {}
        raise AnalysisFailed(f"analysis failed: {err.get('error')}: {err.get('detail')}")
    return Analysis.model_validate(row["result"])


def webhook_secret(rotate: bool = False) -> Call[str]:
    if rotate:
        return Call("POST", "/v1/webhooks/secret/rotate", lambda b: str(b["secret"]))
    return Call("GET", "/v1/webhooks/secret", lambda b: str(b["secret"]))
