"""The synchronous client: `Client` → namespaces (`client.models`, `client.datasets`,
`client.jobs`, `client.methods`, `client.webhooks`) → resources (`Job`, `Model`, ...)."""

from __future__ import annotations

import builtins
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
from pydantic import PrivateAttr

from prunery.analysis import Analysis
from prunery.client import calls
from prunery.client._transport import Call, RetryPolicy, ServerConfig, error_from
from prunery.client.resources import (
    Dataset,
    JobData,
    JobEvent,
    Method,
    Model,
    Page,
    ProgressBar,
    parse_sse,
    safe_names,
)
from prunery.errors import ConfigError, GateMissed, WaitTimeout
from prunery.report import Report
from prunery.spec import JobSpec
from prunery.types import ARTIFACT_NAMES

T = TypeVar("T")


class Job(JobData):
    """A job of a `Client`: `refresh`, `wait`, `report`, `download`, ..."""

    _client: Client | None = PrivateAttr(default=None)

    def _bind(self, client: Client) -> Job:
        self._client = client
        return self

    @property
    def client(self) -> Client:
        if self._client is None:
            raise ConfigError("this Job is not bound to a Client")
        return self._client

    def refresh(self) -> Job:
        self._update(self.client.jobs.get(self.id))
        return self

    def cancel(self) -> Job:
        self._update(self.client.jobs.cancel(self.id))
        return self

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
        bar = ProgressBar(self.id) if progress else None
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
        if raise_on_failure:
            self._raise_if_ended_badly()
        if check_gates and self.gates_passed is False:
            raise GateMissed(self, self.gate_failures())
        return self


class _Namespace:
    def __init__(self, client: Client) -> None:
        self._client = client


class Models(_Namespace):
    def upload(self, path: str | os.PathLike[str], **fields: str) -> Model:
        """Upload a file (streamed). Uploading the same bytes again returns the same object."""
        result: Model = self._client.call(calls.upload(path, calls.MODELS, fields))
        return result

    def get(self, ident: str) -> Model:
        return self._client.call(calls.get(calls.MODELS, ident, Model))

    def list(self, limit: int = 50, offset: int = 0) -> Page:
        body = self._client.call(calls.list_page(calls.MODELS, {"limit": limit, "offset": offset}))
        return Page(data=[Model.model_validate(d) for d in body["data"]], count=body["count"])

    def delete(self, ident: str) -> None:
        self._client.call(calls.delete(calls.MODELS, ident))

    def upload_torch(
        self,
        module: Any,
        example_inputs: Any,
        *,
        filename: str = "model.onnx",
        opset: int = 17,
        dynamic_batch: bool = True,
    ) -> Model:
        """Export a PyTorch module to ONNX on this machine and upload it (see
        `prunery.client.torch_export`; needs torch installed here)."""
        from prunery.client.torch_export import exported_onnx

        with exported_onnx(module, example_inputs, filename, opset, dynamic_batch) as path:
            return self.upload(path)

    def analyze(
        self,
        model_id: str,
        dataset_id: str | None = None,
        *,
        task: str = "classification",
        round_to: int = 1,
        spec: dict[str, Any] | None = None,
        timeout: float = 600.0,
        poll: float = 0.5,
    ) -> Analysis:
        """Run the analysis job (load + analyse, no training) and wait for its result. With a
        `dataset_id`, `spec` ({"method": …, "target": …, "recovery": {"epochs": …}}) gets a
        job-time estimate for that spec (`Analysis.time_estimate`)."""
        from prunery.analysis import AnalysisFailed

        row = self._client.call(calls.create_analysis(model_id, dataset_id, task, round_to, spec))
        deadline = time.monotonic() + timeout
        while row["status"] in ("queued", "running"):
            if time.monotonic() > deadline:
                raise AnalysisFailed(
                    f"analysis {row['id']} still {row['status']} after {timeout:.0f} s"
                )
            time.sleep(poll)
            row = self._client.call(calls.get_analysis(model_id))
        return calls.analysis_result(row)


class Datasets(_Namespace):
    def upload(
        self,
        path: str | os.PathLike[str],
        task: str | None = None,
        image_size: tuple[int, int] | None = None,
        grayscale: bool | None = None,
    ) -> Dataset:
        fields = calls.dataset_fields(task, image_size, grayscale)
        result: Dataset = self._client.call(calls.upload(path, calls.DATASETS, fields))
        return result

    def get(self, ident: str) -> Dataset:
        return self._client.call(calls.get(calls.DATASETS, ident, Dataset))

    def list(self, limit: int = 50, offset: int = 0) -> Page:
        body = self._client.call(
            calls.list_page(calls.DATASETS, {"limit": limit, "offset": offset})
        )
        return Page(data=[Dataset.model_validate(d) for d in body["data"]], count=body["count"])

    def delete(self, ident: str) -> None:
        self._client.call(calls.delete(calls.DATASETS, ident))


class Methods(_Namespace):
    def list(self) -> list[Method]:
        return self._client.call(calls.methods())


class Webhooks(_Namespace):
    def secret(self) -> str:
        """The tenant's webhook signing secret (verify deliveries with prunery.webhooks.verify)."""
        return self._client.call(calls.webhook_secret())

    def rotate_secret(self) -> str:
        return self._client.call(calls.webhook_secret(rotate=True))


class Jobs(_Namespace):
    def _job(self, body: Any) -> Job:
        return Job.model_validate(body)._bind(self._client)

    def create(self, spec: JobSpec | dict[str, Any], idempotency_key: str | None = None) -> Job:
        """Submit a job (always with an Idempotency-Key: a retry never makes a second job)."""
        return self._job(self._client.call(calls.create_job(spec, idempotency_key)))

    def get(self, job_id: str) -> Job:
        return self._job(self._client.call(calls.get_job(job_id)))

    def list(self, status: str | list[str] | None = None, limit: int = 50, offset: int = 0) -> Page:
        body = self._client.call(calls.list_jobs(status, limit, offset))
        return Page(data=[self._job(d) for d in body["data"]], count=body["count"])

    def cancel(self, job_id: str) -> Job:
        return self._job(self._client.call(calls.cancel_job(job_id)))

    def report(self, job_id: str) -> Report:
        return self._client.call(calls.report(job_id))

    def report_html(self, job_id: str) -> str:
        return self._client.call(calls.report_html(job_id))

    def webhooks(self, job_id: str) -> builtins.list[dict[str, Any]]:
        return self._client.call(calls.webhooks(job_id))

    def events(self, job_id: str, follow: bool = False, after: int = 0) -> Iterator[JobEvent]:
        if not follow:
            yield from self._client.call(calls.events(job_id, after))
            return
        with self._client.stream(calls.event_stream(job_id, after)) as response:
            for event in parse_sse(response.iter_lines()):
                if event is None:
                    return
                yield event

    def download(
        self, job_id: str, directory: str | os.PathLike[str], names: Sequence[str] | None = None
    ) -> dict[str, Path]:
        """Stream artifacts into `directory` (written to a temp name, then renamed): by
        default every file the job lists, the same names `prunery prune` writes."""
        if names is None:
            names = self.get(job_id).artifacts or ARTIFACT_NAMES
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        paths: dict[str, Path] = {}
        for name in safe_names(names):
            dest, tmp = out / name, out / f".{name}.part"
            with self._client.stream(calls.artifact(job_id, name)) as response:
                with open(tmp, "wb") as fh:
                    for chunk in response.iter_bytes(1 << 20):
                        fh.write(chunk)
            os.replace(tmp, dest)
            paths[name] = dest
        return paths


class Client:
    """A Prunery server (PRUNERY_URL / PRUNERY_API_KEY, or `prunery serve`'s credentials).

    client = Client()
    model = client.models.upload("net.onnx")
    data = client.datasets.upload("digits.npz")
    job = client.jobs.create({"model_id": model.id, "dataset_id": data.id,
                              "method": {"name": "l1_norm"}, "target": {"flops": 0.5}})
    job.wait(progress=True)
    job.download("out/")
    """

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
        config = ServerConfig.resolve(base_url, api_key)
        self.base_url = config.base_url
        self.retry = RetryPolicy(max_retries, backoff)
        self._http = httpx.Client(transport=transport, **config.http_kwargs(timeout))
        self.models = Models(self)
        self.datasets = Datasets(self)
        self.jobs = Jobs(self)
        self.methods = Methods(self)
        self.webhooks = Webhooks(self)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def send(self, call: Call[Any], stream: bool = False) -> httpx.Response:
        """Send `call` under the retry policy; a 4xx/5xx answer raises its SDK error."""
        attempt = 0
        while True:
            try:
                with call.request(self._http, streamed=True) as request:
                    response = self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                time.sleep(self.retry.after_error(call, attempt, exc, self.base_url))
                attempt += 1
                continue
            delay = self.retry.after_response(call, attempt, response)
            if delay is not None:
                response.close()
                time.sleep(delay)
                attempt += 1
                continue
            if response.status_code >= 400:
                response.read()
                raise error_from(response)
            return response

    def call(self, call: Call[T]) -> T:
        return call.result(self.send(call))

    def request(
        self, method: str, path: str, *, idempotent: bool | None = None, **kwargs: Any
    ) -> Any:
        """Any API request (the JSON body of the answer)."""
        return self.call(Call(method, path, lambda b: b, idempotent=idempotent, **kwargs))

    @contextmanager
    def stream(self, call: Call[Any]) -> Iterator[httpx.Response]:
        response = self.send(call, stream=True)
        try:
            yield response
        finally:
            response.close()
