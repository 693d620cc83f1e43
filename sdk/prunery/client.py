"""The Prunery client: `Client` → namespaces (`client.models`, `client.datasets`,
`client.jobs`, `client.methods`) → resources (`Job`, `Model`, ... as pydantic models).

    from prunery import Client
    client = Client()                       # PRUNERY_URL / PRUNERY_API_KEY, or `prunery serve`'s credentials
    model = client.models.upload("net.onnx")
    data = client.datasets.upload("digits.npz")
    job = client.jobs.create({"model_id": model.id, "dataset_id": data.id,
                              "method": {"name": "l1_norm"}, "target": {"flops": 0.5}})
    job.wait(progress=True)
    job.download("out/")

Only idempotent calls are retried (GET, DELETE, cancel, and job creation, which always sends
an Idempotency-Key), on 429/503/504 and connection errors, with jittered exponential
backoff that honours Retry-After. Depends only on httpx and pydantic.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, PrivateAttr

from prunery.analysis import Analysis
from prunery.errors import (
    ConfigError,
    ConnectionFailed,
    GateMissed,
    JobCancelled,
    JobFailed,
    WaitTimeout,
    error_for,
)
from prunery.report import Report
from prunery.spec import JobSpec

JobStatus = Literal["queued", "running", "cancelling", "succeeded", "failed", "cancelled"]
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
RETRY_STATUSES = frozenset({429, 503, 504})
ARTIFACTS = ("model.onnx", "report.json", "report.md")


def prunery_home() -> Path:
    return Path(os.environ.get("PRUNERY_HOME") or Path.home() / ".prunery")


def credentials_path() -> Path:
    return prunery_home() / "credentials.json"


def load_credentials() -> dict[str, str]:
    path = credentials_path()
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------- resources


class _Resource(BaseModel):
    model_config = ConfigDict(extra="allow")
    _client: Client | None = PrivateAttr(default=None)

    def _bind(self, client: Client) -> _Resource:
        self._client = client
        return self


class Model(_Resource):
    id: str
    filename: str
    sha256: str
    size_bytes: int
    created_at: datetime
    opset: int
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    op_histogram: dict[str, int]
    parameter_count: int


class Dataset(_Resource):
    id: str
    filename: str
    format: str
    sha256: str
    size_bytes: int
    created_at: datetime
    task: str
    train: int
    test: int
    sample_shape: list[int]
    num_classes: int


class Method(_Resource):
    name: str
    summary: str
    paper: str
    tasks: list[str]
    params_schema: dict[str, Any]


class ErrorInfo(BaseModel):
    error: str
    detail: str


class JobEvent(BaseModel):
    id: int
    at: datetime
    kind: str
    status: str | None = None
    stage: str | None = None
    progress: float | None = None
    message: str | None = None


class Job(_Resource):
    id: str
    status: JobStatus
    stage: str | None = None
    progress: float = 0.0
    message: str | None = None
    error: ErrorInfo | None = None
    gates_passed: bool | None = None
    attempts: int = 0
    max_attempts: int = 0
    model_id: str | None = None
    dataset_id: str | None = None
    spec: dict[str, Any] = {}
    artifacts: list[str] = []
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @property
    def client(self) -> Client:
        if self._client is None:
            raise ConfigError("this Job is not bound to a Client")
        return self._client

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    def _update(self, other: Job) -> Job:
        for name in type(self).model_fields:
            setattr(self, name, getattr(other, name))
        return self

    def refresh(self) -> Job:
        return self._update(self.client.jobs.get(self.id))

    def cancel(self) -> Job:
        return self._update(self.client.jobs.cancel(self.id))

    def report(self) -> Report:
        return self.client.jobs.report(self.id)

    def report_html(self) -> str:
        """The report as one self-contained HTML page (inline SVG plots)."""
        return self.client.jobs.report_html(self.id)

    def webhooks(self) -> list[dict[str, Any]]:
        """The job's webhook deliveries, each with every attempt."""
        return self.client.jobs.webhooks(self.id)

    def events(self, follow: bool = False, after: int = 0) -> Iterator[JobEvent]:
        return self.client.jobs.events(self.id, follow=follow, after=after)

    def download(
        self, directory: str | os.PathLike[str], names: Sequence[str] | None = None
    ) -> dict[str, Path]:
        """Every artifact of the job (or only `names`)."""
        return self.client.jobs.download(self.id, directory, names)

    def gate_failures(self) -> list[str]:
        if self.gates_passed is not False:
            return []
        report = self.report()
        return [f"{g.name}: {g.value:g} > {g.limit:g}" for g in report.gates if not g.passed]

    def wait(
        self,
        progress: bool = False,
        timeout: float | None = None,
        poll_interval: float = 1.0,
        raise_on_failure: bool = True,
        check_gates: bool = False,
    ) -> Job:
        """Poll until the job ends. Raises JobFailed / JobCancelled (unless
        raise_on_failure=False), GateMissed when check_gates and a gate was missed, and
        WaitTimeout after `timeout` seconds."""
        bar = _ProgressBar(self.id) if progress else None
        start = time.monotonic()
        try:
            while True:
                self.refresh()
                if bar:
                    bar.update(self)
                if self.done:
                    break
                if timeout is not None and time.monotonic() - start > timeout:
                    raise WaitTimeout(self, timeout)
                time.sleep(poll_interval)
        finally:
            if bar:
                bar.close()
        if raise_on_failure and self.status == "cancelled":
            raise JobCancelled(self)
        if raise_on_failure and self.status == "failed":
            raise JobFailed(self)
        if check_gates and self.gates_passed is False:
            raise GateMissed(self, self.gate_failures())
        return self


class _ProgressBar:
    """A dependency-free text progress bar on stderr."""

    def __init__(self, job_id: str, width: int = 30, stream: Any = None) -> None:
        self.job_id, self.width = job_id, width
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last = ""

    def update(self, job: Job) -> None:
        filled = int(round(job.progress * self.width))
        bar = "#" * filled + "-" * (self.width - filled)
        what = job.stage or job.status
        msg = f" {job.message[:50]}" if job.message else ""
        line = f"{self.job_id} [{bar}] {job.progress * 100:5.1f}% {job.status}:{what}{msg}"
        if self.tty:
            self.stream.write("\r\033[K" + line)
            self.stream.flush()
        elif line.split("%")[-1] != self._last.split("%")[-1]:  # non-TTY: one line per change
            self.stream.write(line + "\n")
            self.stream.flush()
        self._last = line

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


class Page(BaseModel):
    data: list[Any]
    count: int


# ---------------------------------------------------------------- namespaces


class _Namespace:
    def __init__(self, client: Client) -> None:
        self._client = client


class Models(_Namespace):
    path = "/v1/models"
    resource: type[_Resource] = Model

    def upload(self, path: str | os.PathLike[str], **fields: str) -> Any:
        """Upload a file (streamed). Uploading the same bytes again returns the same object."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(path)

        def files() -> dict[str, Any]:
            return {"file": (path.name, open(path, "rb"), "application/octet-stream")}

        data = {k: str(v) for k, v in fields.items() if v is not None}
        # Uploads are idempotent (deduplicated by sha256), so they may be retried.
        body = self._client.request("POST", self.path, files=files, data=data, idempotent=True)
        return self.resource.model_validate(body)._bind(self._client)

    def get(self, ident: str) -> Any:
        return self.resource.model_validate(
            self._client.request("GET", f"{self.path}/{ident}")
        )._bind(self._client)

    def list(self, limit: int = 50, offset: int = 0) -> Page:
        body = self._client.request("GET", self.path, params={"limit": limit, "offset": offset})
        return Page(
            data=[self.resource.model_validate(d)._bind(self._client) for d in body["data"]],
            count=body["count"],
        )

    def delete(self, ident: str) -> None:
        self._client.request("DELETE", f"{self.path}/{ident}")

    def upload_torch(
        self,
        module: Any,
        example_inputs: Any,
        *,
        filename: str = "model.onnx",
        opset: int = 17,
        dynamic_batch: bool = True,
    ) -> Any:
        """Export a PyTorch module to ONNX on this machine and upload it.

        `example_inputs` is one tensor (or a 1-tuple) shaped like a batch of samples; the
        export has a dynamic batch dimension and the weights inside the file (Prunery
        refuses separate `.onnx.data` files). Needs torch (and onnx) installed here; the
        server never receives Python code or pickles.
        """
        try:
            import torch
        except ImportError as exc:
            raise ConfigError(f"upload_torch needs PyTorch installed on this machine: {exc}") from None
        import tempfile

        inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        if len(inputs) != 1 or not isinstance(inputs[0], torch.Tensor):
            raise ValueError(
                "example_inputs must be one tensor (Prunery prunes single-input models), "
                f"got {type(example_inputs).__name__}"
            )
        was_training = module.training
        module.eval()
        try:
            with tempfile.TemporaryDirectory(prefix="prunery-upload-") as tmp:
                path = Path(tmp) / Path(filename).name
                axes = {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None
                with torch.no_grad():
                    torch.onnx.export(
                        module, inputs, str(path), dynamo=False, opset_version=opset,
                        input_names=["input"], output_names=["output"], dynamic_axes=axes,
                    )
                extra = [p.name for p in Path(tmp).iterdir() if p.name != path.name]
                if extra:
                    raise ValueError(
                        f"the export wrote external weight files ({', '.join(extra)}): the model is "
                        "over the 2 GB ONNX limit for one file"
                    )
                return self.upload(path)
        finally:
            module.train(was_training)

    def analyze(
        self, model_id: str, dataset_id: str | None = None, *, task: str = "classification",
        round_to: int = 1, timeout: float = 600.0, poll: float = 0.5,
    ) -> Analysis:
        """Run the analysis job (load + analyse, no training) and wait for its result."""
        from prunery.analysis import AnalysisFailed

        analyses = Analyses(self._client)
        row = analyses.create(model_id, dataset_id, task=task, round_to=round_to)
        deadline = time.monotonic() + timeout
        while row["status"] in ("queued", "running"):
            if time.monotonic() > deadline:
                raise AnalysisFailed(f"analysis {row['id']} still {row['status']} after {timeout:.0f} s")
            time.sleep(poll)
            row = analyses.get(model_id)
        if row["status"] != "succeeded":
            err = row.get("error") or {}
            raise AnalysisFailed(f"analysis failed: {err.get('error')}: {err.get('detail')}")
        return Analysis.model_validate(row["result"])


class Analyses(_Namespace):
    """`client.models.analyze(model_id)`: what can be pruned, before a job is paid for."""

    def create(self, model_id: str, dataset_id: str | None = None, *, task: str = "classification",
               round_to: int = 1) -> dict[str, Any]:
        body = {"dataset_id": dataset_id, "task": task, "round_to": round_to}
        return self._client.request("POST", f"/v1/models/{model_id}/analysis", json=body)

    def get(self, model_id: str) -> dict[str, Any]:
        return self._client.request("GET", f"/v1/models/{model_id}/analysis")


class Datasets(Models):
    path = "/v1/datasets"
    resource = Dataset

    def upload(
        self,
        path: str | os.PathLike[str],
        task: str | None = None,  # type: ignore[override]
        image_size: tuple[int, int] | None = None,
        grayscale: bool | None = None,
    ) -> Dataset:
        fields: dict[str, Any] = {"task": task}
        if image_size:
            fields["image_size"] = f"{image_size[0]},{image_size[1]}"
        if grayscale is not None:
            fields["grayscale"] = str(grayscale).lower()
        return super().upload(path, **{k: v for k, v in fields.items() if v is not None})


class Methods(_Namespace):
    def list(self) -> list[Method]:
        return [
            Method.model_validate(m) for m in self._client.request("GET", "/v1/methods")["data"]
        ]


class Jobs(_Namespace):
    def create(self, spec: JobSpec | dict[str, Any], idempotency_key: str | None = None) -> Job:
        """Submit a job. An Idempotency-Key is always sent (a fresh one unless given), so a
        retried submission never creates a second job."""
        body = (
            spec.model_dump(mode="json", exclude_none=True) if isinstance(spec, JobSpec) else spec
        )
        key = idempotency_key or str(uuid.uuid4())
        job = self._client.request(
            "POST", "/v1/jobs", json=body, headers={"Idempotency-Key": key}, idempotent=True
        )
        return Job.model_validate(job)._bind(self._client)  # type: ignore[return-value]

    def get(self, job_id: str) -> Job:
        return Job.model_validate(self._client.request("GET", f"/v1/jobs/{job_id}"))._bind(
            self._client
        )  # type: ignore[return-value]

    def list(self, status: str | list[str] | None = None, limit: int = 50, offset: int = 0) -> Page:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if status:
            params["status"] = [status] if isinstance(status, str) else status
        body = self._client.request("GET", "/v1/jobs", params=params)
        return Page(
            data=[Job.model_validate(d)._bind(self._client) for d in body["data"]],
            count=body["count"],
        )

    def cancel(self, job_id: str) -> Job:
        # Cancelling twice is harmless, so the call is retried like a GET.
        body = self._client.request("POST", f"/v1/jobs/{job_id}/cancel", idempotent=True)
        return Job.model_validate(body)._bind(self._client)  # type: ignore[return-value]

    def report(self, job_id: str) -> Report:
        return Report.model_validate(self._client.request("GET", f"/v1/jobs/{job_id}/report"))

    def report_html(self, job_id: str) -> str:
        return self._client._send("GET", f"/v1/jobs/{job_id}/report.html", idempotent=True).text

    def webhooks(self, job_id: str) -> list[dict[str, Any]]:
        return self._client.request("GET", f"/v1/jobs/{job_id}/webhooks")["data"]

    def events(self, job_id: str, follow: bool = False, after: int = 0) -> Iterator[JobEvent]:
        if not follow:
            body = self._client.request(
                "GET",
                f"/v1/jobs/{job_id}/events",
                params={"after": after},
                headers={"Accept": "application/json"},
            )
            yield from (JobEvent.model_validate(e) for e in body)
            return
        with self._client.stream(
            "GET",
            f"/v1/jobs/{job_id}/events",
            params={"after": after},
            headers={"Accept": "text/event-stream"},
        ) as response:
            kind, data = None, []
            for line in response.iter_lines():
                if line == "":
                    if kind not in (None, "end") and data:
                        yield JobEvent.model_validate_json("\n".join(data))
                    if kind == "end":
                        return
                    kind, data = None, []
                elif line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].strip())

    def download(
        self, job_id: str, directory: str | os.PathLike[str], names: Sequence[str] | None = None
    ) -> dict[str, Path]:
        """Stream artifacts into `directory` (written to a temp name, then renamed): by
        default every file the job lists, the same names `prunery prune` writes."""
        if names is None:
            names = self.get(job_id).artifacts or ARTIFACTS
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        paths: dict[str, Path] = {}
        for name in _safe_names(names):
            dest = out / name
            tmp = out / f".{name}.part"
            with self._client.stream("GET", f"/v1/jobs/{job_id}/artifacts/{name}") as response:
                with open(tmp, "wb") as fh:
                    for chunk in response.iter_bytes(1 << 20):
                        fh.write(chunk)
            os.replace(tmp, dest)
            paths[name] = dest
        return paths


def _safe_names(names: Sequence[str]) -> list[str]:
    """Artifact names are plain file names; refuse anything that would write elsewhere."""
    for name in names:
        if not name or Path(name).name != name or name.startswith("."):
            raise ValueError(f"refusing to download an artifact named {name!r}")
    return list(names)


# ---------------------------------------------------------------- the client


class Webhooks(_Namespace):
    def secret(self) -> str:
        """The tenant's webhook signing secret (verify deliveries with prunery.webhooks.verify)."""
        return self._client.request("GET", "/v1/webhooks/secret")["secret"]

    def rotate_secret(self) -> str:
        return self._client.request("POST", "/v1/webhooks/secret/rotate")["secret"]


class Client:
    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        max_retries: int = 4,
        backoff: float = 0.5,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        creds: dict[str, str] = {}
        if not (base_url or os.environ.get("PRUNERY_URL")) or not (
            api_key or os.environ.get("PRUNERY_API_KEY")
        ):
            creds = load_credentials()
        self.base_url = (
            base_url or os.environ.get("PRUNERY_URL") or creds.get("url") or ""
        ).rstrip("/")
        api_key = api_key or os.environ.get("PRUNERY_API_KEY") or creds.get("api_key")
        if not self.base_url:
            raise ConfigError(
                "no Prunery server: pass base_url, set PRUNERY_URL, or start one with `prunery serve`"
            )
        self.max_retries, self.backoff = max_retries, backoff
        headers = {"User-Agent": "prunery-sdk/0.1"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=10.0),
            transport=transport,
        )
        self.models = Models(self)
        self.datasets = Datasets(self)
        self.jobs = Jobs(self)
        self.methods = Methods(self)
        self.webhooks = Webhooks(self)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        if response is not None:
            retry_after = response.headers.get("Retry-After", "")
            if retry_after.isdigit():
                return min(60.0, float(retry_after)) * random.uniform(1.0, 1.2)
        # Exponential backoff with full jitter.
        return random.uniform(0, min(30.0, self.backoff * 2**attempt))

    def _send(
        self,
        method: str,
        path: str,
        *,
        idempotent: bool | None,
        stream: bool = False,
        files: Callable[[], dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        if idempotent is None:
            idempotent = method in ("GET", "HEAD", "DELETE", "PUT", "OPTIONS")
        attempt = 0
        while True:
            opened = files() if files else None
            try:
                request = self._http.build_request(method, path, files=opened, **kwargs)
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                if not idempotent or attempt >= self.max_retries:
                    raise ConnectionFailed(f"{method} {self.base_url}{path}: {exc}") from exc
                time.sleep(self._delay(attempt, None))
                attempt += 1
                continue
            finally:
                if opened:
                    for value in opened.values():
                        if isinstance(value, tuple) and hasattr(value[1], "close"):
                            value[1].close()
            if response.status_code in RETRY_STATUSES and idempotent and attempt < self.max_retries:
                response.close()
                time.sleep(self._delay(attempt, response))
                attempt += 1
                continue
            if response.status_code >= 400:
                if stream:
                    response.read()
                raise self._error(response)
            return response

    @staticmethod
    def _error(response: httpx.Response) -> Exception:
        try:
            body = response.json()
            code, detail = body.get("error", "http_error"), body.get("detail", response.text)
        except ValueError:
            code, detail = "http_error", response.text[:500] or response.reason_phrase
        return error_for(response.status_code, str(code), str(detail), response)

    def request(
        self, method: str, path: str, *, idempotent: bool | None = None, **kwargs: Any
    ) -> Any:
        response = self._send(method, path, idempotent=idempotent, **kwargs)
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    def stream(self, method: str, path: str, **kwargs: Any) -> _Stream:
        return _Stream(self, method, path, kwargs)


class _Stream:
    def __init__(self, client: Client, method: str, path: str, kwargs: dict[str, Any]) -> None:
        self.client, self.method, self.path, self.kwargs = client, method, path, kwargs
        self.response: httpx.Response | None = None

    def __enter__(self) -> httpx.Response:
        self.response = self.client._send(
            self.method, self.path, idempotent=True, stream=True, **self.kwargs
        )
        return self.response

    def __exit__(self, *exc: Any) -> None:
        if self.response is not None:
            self.response.close()


# ---------------------------------------------------------------- async twin


class AsyncJob(Job):
    """A Job whose network methods are coroutines (from AsyncClient)."""

    _aclient: AsyncClient | None = PrivateAttr(default=None)

    def _abind(self, client: AsyncClient) -> AsyncJob:
        self._aclient = client
        return self

    @property
    def aclient(self) -> AsyncClient:
        if self._aclient is None:
            raise ConfigError("this AsyncJob is not bound to an AsyncClient")
        return self._aclient

    async def refresh(self) -> AsyncJob:  # type: ignore[override]
        return self._update(await self.aclient.jobs.get(self.id))  # type: ignore[return-value]

    async def cancel(self) -> AsyncJob:  # type: ignore[override]
        return self._update(await self.aclient.jobs.cancel(self.id))  # type: ignore[return-value]

    async def report(self) -> Report:  # type: ignore[override]
        return await self.aclient.jobs.report(self.id)

    async def download(
        self, directory: str | os.PathLike[str], names: Sequence[str] | None = None
    ) -> dict[str, Path]:  # type: ignore[override]
        return await self.aclient.jobs.download(self.id, directory, names)

    async def wait(  # type: ignore[override]
        self,
        progress: bool = False,
        timeout: float | None = None,
        poll_interval: float = 1.0,
        raise_on_failure: bool = True,
    ) -> AsyncJob:
        import asyncio

        bar = _ProgressBar(self.id) if progress else None
        start = time.monotonic()
        try:
            while True:
                await self.refresh()
                if bar:
                    bar.update(self)
                if self.done:
                    break
                if timeout is not None and time.monotonic() - start > timeout:
                    raise WaitTimeout(self, timeout)
                await asyncio.sleep(poll_interval)
        finally:
            if bar:
                bar.close()
        if raise_on_failure and self.status == "cancelled":
            raise JobCancelled(self)
        if raise_on_failure and self.status == "failed":
            raise JobFailed(self)
        return self


class _AsyncUploads:
    path = "/v1/models"
    resource: type[_Resource] = Model

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def upload(self, path: str | os.PathLike[str], **fields: str) -> Any:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(path)

        def files() -> dict[str, Any]:
            # httpx's async client needs the bytes of a sync file; uploads through the async
            # client are read in full, the sync Client streams from disk.
            return {"file": (path.name, path.read_bytes(), "application/octet-stream")}

        data = {k: str(v) for k, v in fields.items() if v is not None}
        body = await self._client.request(
            "POST", self.path, files=files, data=data, idempotent=True
        )
        return self.resource.model_validate(body)

    async def get(self, ident: str) -> Any:
        return self.resource.model_validate(
            await self._client.request("GET", f"{self.path}/{ident}")
        )

    async def delete(self, ident: str) -> None:
        await self._client.request("DELETE", f"{self.path}/{ident}")


class _AsyncDatasets(_AsyncUploads):
    path = "/v1/datasets"
    resource = Dataset


class _AsyncJobs:
    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    def _job(self, body: Any) -> AsyncJob:
        return AsyncJob.model_validate(body)._abind(self._client)

    async def create(
        self, spec: JobSpec | dict[str, Any], idempotency_key: str | None = None
    ) -> AsyncJob:
        body = (
            spec.model_dump(mode="json", exclude_none=True) if isinstance(spec, JobSpec) else spec
        )
        headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        return self._job(
            await self._client.request(
                "POST", "/v1/jobs", json=body, headers=headers, idempotent=True
            )
        )

    async def get(self, job_id: str) -> AsyncJob:
        return self._job(await self._client.request("GET", f"/v1/jobs/{job_id}"))

    async def list(
        self, status: str | list[str] | None = None, limit: int = 50, offset: int = 0
    ) -> Page:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if status:
            params["status"] = [status] if isinstance(status, str) else status
        body = await self._client.request("GET", "/v1/jobs", params=params)
        return Page(data=[self._job(d) for d in body["data"]], count=body["count"])

    async def cancel(self, job_id: str) -> AsyncJob:
        return self._job(
            await self._client.request("POST", f"/v1/jobs/{job_id}/cancel", idempotent=True)
        )

    async def report(self, job_id: str) -> Report:
        return Report.model_validate(await self._client.request("GET", f"/v1/jobs/{job_id}/report"))

    async def download(
        self, job_id: str, directory: str | os.PathLike[str], names: Sequence[str] | None = None
    ) -> dict[str, Path]:
        if names is None:
            names = (await self.get(job_id)).artifacts or ARTIFACTS
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        paths: dict[str, Path] = {}
        for name in _safe_names(names):
            dest, tmp = out / name, out / f".{name}.part"
            response = await self._client._send(
                "GET", f"/v1/jobs/{job_id}/artifacts/{name}", idempotent=True, stream=True
            )
            try:
                with open(tmp, "wb") as fh:
                    async for chunk in response.aiter_bytes(1 << 20):
                        fh.write(chunk)
            finally:
                await response.aclose()
            os.replace(tmp, dest)
            paths[name] = dest
        return paths


class AsyncClient:
    """The asyncio twin of Client (same configuration, retries and errors)."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        max_retries: int = 4,
        backoff: float = 0.5,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        creds = (
            load_credentials()
            if not (base_url or os.environ.get("PRUNERY_URL"))
            or not (api_key or os.environ.get("PRUNERY_API_KEY"))
            else {}
        )
        self.base_url = (
            base_url or os.environ.get("PRUNERY_URL") or creds.get("url") or ""
        ).rstrip("/")
        api_key = api_key or os.environ.get("PRUNERY_API_KEY") or creds.get("api_key")
        if not self.base_url:
            raise ConfigError(
                "no Prunery server: pass base_url, set PRUNERY_URL, or start one with `prunery serve`"
            )
        self.max_retries, self.backoff = max_retries, backoff
        headers = {"User-Agent": "prunery-sdk/0.1"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=10.0),
            transport=transport,
        )
        self.models = _AsyncUploads(self)
        self.datasets = _AsyncDatasets(self)
        self.jobs = _AsyncJobs(self)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    _delay = Client._delay

    async def _send(
        self,
        method: str,
        path: str,
        *,
        idempotent: bool | None,
        stream: bool = False,
        files: Callable[[], dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        import asyncio

        if idempotent is None:
            idempotent = method in ("GET", "HEAD", "DELETE", "PUT", "OPTIONS")
        attempt = 0
        while True:
            try:
                request = self._http.build_request(
                    method, path, files=files() if files else None, **kwargs
                )
                response = await self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                if not idempotent or attempt >= self.max_retries:
                    raise ConnectionFailed(f"{method} {self.base_url}{path}: {exc}") from exc
                await asyncio.sleep(self._delay(attempt, None))
                attempt += 1
                continue
            if response.status_code in RETRY_STATUSES and idempotent and attempt < self.max_retries:
                await response.aclose()
                await asyncio.sleep(self._delay(attempt, response))
                attempt += 1
                continue
            if response.status_code >= 400:
                await response.aread()
                raise Client._error(response)
            return response

    async def request(
        self, method: str, path: str, *, idempotent: bool | None = None, **kwargs: Any
    ) -> Any:
        response = await self._send(method, path, idempotent=idempotent, **kwargs)
        if response.status_code == 204 or not response.content:
            return None
        return response.json()
