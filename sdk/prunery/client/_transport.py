"""What the sync and the async client share: where the server is, the one retry policy, how
a request is described (`Call`) and how a response becomes a value or an error.

Only idempotent calls are retried (GET, DELETE, cancel, uploads and job creation, which
always sends an Idempotency-Key), on 429/503/504 and connection errors, with jittered
exponential backoff that honours Retry-After.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import httpx

from prunery.errors import ConfigError, ConnectionFailed, error_for
from prunery.types import prunery_home

T = TypeVar("T")

RETRY_STATUSES = frozenset({429, 503, 504})
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "DELETE", "PUT", "OPTIONS"})
USER_AGENT = "prunery-sdk/0.1"


def credentials_path() -> Path:
    return prunery_home() / "credentials.json"


def load_credentials() -> dict[str, str]:
    try:
        creds = json.loads(credentials_path().read_text())
    except (OSError, ValueError):
        return {}
    return creds if isinstance(creds, dict) else {}


@dataclass(frozen=True)
class ServerConfig:
    """The server URL and the headers of every request: arguments, then PRUNERY_URL /
    PRUNERY_API_KEY, then the credentials `prunery serve` wrote."""

    base_url: str
    headers: dict[str, str]

    @classmethod
    def resolve(cls, base_url: str | None, api_key: str | None) -> ServerConfig:
        creds: dict[str, str] = {}
        if not (base_url or os.environ.get("PRUNERY_URL")) or not (
            api_key or os.environ.get("PRUNERY_API_KEY")
        ):
            creds = load_credentials()
        url = (base_url or os.environ.get("PRUNERY_URL") or creds.get("url") or "").rstrip("/")
        key = api_key or os.environ.get("PRUNERY_API_KEY") or creds.get("api_key")
        if not url:
            raise ConfigError(
                "no Prunery server: pass base_url, set PRUNERY_URL, or start one with `prunery serve`"
            )
        headers = {"User-Agent": USER_AGENT}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return cls(url, headers)

    def http_kwargs(self, timeout: float) -> dict[str, Any]:
        return {
            "base_url": self.base_url,
            "headers": self.headers,
            "timeout": httpx.Timeout(timeout, connect=10.0),
        }


@dataclass(frozen=True)
class RetryPolicy:
    """The one retry policy of both clients."""

    max_retries: int = 4
    backoff: float = 0.5

    def delay(self, attempt: int, response: httpx.Response | None) -> float:
        if response is not None:
            retry_after = response.headers.get("Retry-After", "")
            if retry_after.isdigit():
                return min(60.0, float(retry_after)) * random.uniform(1.0, 1.2)
        # Exponential backoff with full jitter.
        return random.uniform(0, min(30.0, self.backoff * 2**attempt))

    def after_response(
        self, call: Call[Any], attempt: int, response: httpx.Response
    ) -> float | None:
        """Seconds to wait before trying again, or None: the response is final."""
        if response.status_code in RETRY_STATUSES and call.retryable and attempt < self.max_retries:
            return self.delay(attempt, response)
        return None

    def after_error(
        self, call: Call[Any], attempt: int, exc: httpx.TransportError, base_url: str
    ) -> float:
        """Seconds to wait before trying again; raises ConnectionFailed when it is over."""
        if not call.retryable or attempt >= self.max_retries:
            raise ConnectionFailed(f"{call.method} {base_url}{call.path}: {exc}") from exc
        return self.delay(attempt, None)


def _json_body(response: httpx.Response) -> Any:
    if response.status_code == 204 or not response.content:
        return None
    return response.json()


@dataclass(frozen=True)
class Call(Generic[T]):
    """One API request, described once for both clients: what to send and how to read
    the answer (`parse` gets the JSON body, or the response itself when `raw`)."""

    method: str
    path: str
    parse: Callable[[Any], T]
    idempotent: bool | None = None
    params: dict[str, Any] | None = None
    json: Any = None
    headers: dict[str, str] | None = None
    data: dict[str, str] | None = None
    upload: Path | None = None
    raw: bool = False

    @property
    def retryable(self) -> bool:
        if self.idempotent is None:
            return self.method in IDEMPOTENT_METHODS
        return self.idempotent

    @contextmanager
    def request(
        self, http: httpx.Client | httpx.AsyncClient, streamed: bool
    ) -> Iterator[httpx.Request]:
        """The httpx request. An upload is streamed from disk by the sync client (the file
        is closed on leaving the block); httpx's async client needs bytes, so it reads the
        file in full."""
        handle = open(self.upload, "rb") if self.upload is not None and streamed else None
        try:
            files = None
            if self.upload is not None:
                content: Any = handle if handle is not None else self.upload.read_bytes()
                files = {"file": (self.upload.name, content, "application/octet-stream")}
            yield http.build_request(
                self.method,
                self.path,
                params=self.params,
                json=self.json,
                headers=self.headers,
                data=self.data,
                files=files,
            )
        finally:
            if handle is not None:
                handle.close()

    def result(self, response: httpx.Response) -> T:
        return self.parse(response if self.raw else _json_body(response))


def error_from(response: httpx.Response) -> Exception:
    """The SDK error of a 4xx/5xx response (the body must have been read)."""
    try:
        body = response.json()
        code, detail = body.get("error", "http_error"), body.get("detail", response.text)
    except ValueError:
        code, detail = "http_error", response.text[:500] or response.reason_phrase
    return error_for(response.status_code, str(code), str(detail), response)
