"""The asyncio client: the same requests (`prunery.client.calls`), retry policy and errors
as `Client`, with coroutines. `AsyncJob` shares `Job`'s fields (JobData), not its methods."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx
from pydantic import PrivateAttr

from prunery.client import calls
from prunery.client._transport import Call, RetryPolicy, ServerConfig, error_from
from prunery.client.resources import Dataset, JobData, Model, Page, ProgressBar, safe_names
from prunery.errors import ConfigError, WaitTimeout
from prunery.report import Report
from prunery.spec import JobSpec
from prunery.types import ARTIFACT_NAMES

T = TypeVar("T")


class AsyncJob(JobData):
    """A job of an `AsyncClient`: its network methods are coroutines."""

    _client: AsyncClient | None = PrivateAttr(default=None)

    def _bind(self, client: AsyncClient) -> AsyncJob:
        self._client = client
        return self

    @property
    def client(self) -> AsyncClient:
        if self._client is None:
            raise ConfigError("this AsyncJob is not bound to an AsyncClient")
        return self._client

    async def refresh(self) -> AsyncJob:
        self._update(await self.client.jobs.get(self.id))
        return self

    async def cancel(self) -> AsyncJob:
        self._update(await self.client.jobs.cancel(self.id))
        return self

    async def report(self) -> Report:
        return await self.client.jobs.report(self.id)

    async def download(
        self, directory: str | os.PathLike[str], names: Sequence[str] | None = None
    ) -> dict[str, Path]:
        return await self.client.jobs.download(self.id, directory, names)

    async def wait(
        self,
        progress: bool = False,
        timeout: float | None = None,
        poll_interval: float = 1.0,
        raise_on_failure: bool = True,
    ) -> AsyncJob:
        bar = ProgressBar(self.id) if progress else None
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
        if raise_on_failure:
            self._raise_if_ended_badly()
        return self


class _AsyncUploads:
    collection = calls.MODELS
    resource: type[Model] | type[Dataset] = Model

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def upload(self, path: str | os.PathLike[str], **fields: str) -> Any:
        return await self._client.call(calls.upload(path, self.collection, fields))

    async def get(self, ident: str) -> Any:
        return await self._client.call(calls.get(self.collection, ident, self.resource))

    async def delete(self, ident: str) -> None:
        await self._client.call(calls.delete(self.collection, ident))


class _AsyncDatasets(_AsyncUploads):
    collection = calls.DATASETS
    resource = Dataset


class _AsyncJobs:
    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    def _job(self, body: Any) -> AsyncJob:
        return AsyncJob.model_validate(body)._bind(self._client)

    async def create(
        self, spec: JobSpec | dict[str, Any], idempotency_key: str | None = None
    ) -> AsyncJob:
        return self._job(await self._client.call(calls.create_job(spec, idempotency_key)))

    async def get(self, job_id: str) -> AsyncJob:
        return self._job(await self._client.call(calls.get_job(job_id)))

    async def list(
        self, status: str | list[str] | None = None, limit: int = 50, offset: int = 0
    ) -> Page:
        body = await self._client.call(calls.list_jobs(status, limit, offset))
        return Page(data=[self._job(d) for d in body["data"]], count=body["count"])

    async def cancel(self, job_id: str) -> AsyncJob:
        return self._job(await self._client.call(calls.cancel_job(job_id)))

    async def report(self, job_id: str) -> Report:
        return await self._client.call(calls.report(job_id))

    async def download(
        self, job_id: str, directory: str | os.PathLike[str], names: Sequence[str] | None = None
    ) -> dict[str, Path]:
        if names is None:
            names = (await self.get(job_id)).artifacts or ARTIFACT_NAMES
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        paths: dict[str, Path] = {}
        for name in safe_names(names):
            dest, tmp = out / name, out / f".{name}.part"
            response = await self._client.send(calls.artifact(job_id, name), stream=True)
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
    """The asyncio twin of Client (same configuration, requests, retries and errors)."""

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
        config = ServerConfig.resolve(base_url, api_key)
        self.base_url = config.base_url
        self.retry = RetryPolicy(max_retries, backoff)
        self._http = httpx.AsyncClient(transport=transport, **config.http_kwargs(timeout))
        self.models = _AsyncUploads(self)
        self.datasets = _AsyncDatasets(self)
        self.jobs = _AsyncJobs(self)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def send(self, call: Call[Any], stream: bool = False) -> httpx.Response:
        """Send `call` under the retry policy; a 4xx/5xx answer raises its SDK error."""
        attempt = 0
        while True:
            try:
                with call.request(self._http, streamed=False) as request:
                    response = await self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                await asyncio.sleep(self.retry.after_error(call, attempt, exc, self.base_url))
                attempt += 1
                continue
            delay = self.retry.after_response(call, attempt, response)
            if delay is not None:
                await response.aclose()
                await asyncio.sleep(delay)
                attempt += 1
                continue
            if response.status_code >= 400:
                await response.aread()
                raise error_from(response)
            return response

    async def call(self, call: Call[T]) -> T:
        return call.result(await self.send(call))

    async def request(
        self, method: str, path: str, *, idempotent: bool | None = None, **kwargs: Any
    ) -> Any:
        """Any API request (the JSON body of the answer)."""
        return await self.call(Call(method, path, lambda b: b, idempotent=idempotent, **kwargs))
