"""SDK errors. Two kinds: the API said no (`APIError`, one subclass per status), and a job
ended badly (`JobFailed`, `JobCancelled`; `GateMissed` when asked for)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prunery.client.resources import JobData as Job


class PruneryError(Exception):
    """Base of every error the SDK raises."""


class ConfigError(PruneryError):
    """No server URL or API key could be found."""


class APIError(PruneryError):
    status: int = 0

    def __init__(self, status: int, code: str, detail: str, response: Any = None) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status, self.code, self.detail, self.response = status, code, detail, response


class BadRequest(APIError):
    status = 400


class Unauthorized(APIError):
    status = 401


class NotFound(APIError):
    status = 404


class Conflict(APIError):
    status = 409


class PayloadTooLarge(APIError):
    status = 413


class UnsupportedMediaType(APIError):
    status = 415


class ValidationError(APIError):
    status = 422


class RateLimited(APIError):
    status = 429


class ServerError(APIError):
    status = 500


class ServiceUnavailable(ServerError):
    status = 503


class GatewayTimeout(ServerError):
    status = 504


class ConnectionFailed(PruneryError):
    """The server could not be reached (after retries, for idempotent calls)."""


_BY_STATUS: dict[int, type[APIError]] = {
    cls.status: cls
    for cls in (
        BadRequest,
        Unauthorized,
        NotFound,
        Conflict,
        PayloadTooLarge,
        UnsupportedMediaType,
        ValidationError,
        RateLimited,
        ServerError,
        ServiceUnavailable,
        GatewayTimeout,
    )
}


def error_for(status: int, code: str, detail: str, response: Any = None) -> APIError:
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else APIError)
    err = cls(status, code, detail, response)
    err.status = status
    return err


class JobFailed(PruneryError):
    """The job ended `failed` (or `cancelled`, as JobCancelled); `.job` has the details."""

    def __init__(self, job: Job) -> None:
        err = job.error
        reason = f"{err.error}: {err.detail}" if err else job.status
        super().__init__(f"job {job.id} {job.status}: {reason}")
        self.job = job


class JobCancelled(JobFailed):
    pass


class GateMissed(PruneryError):
    """The job succeeded but a gate (e.g. max_accuracy_drop) was missed."""

    def __init__(self, job: Job, failures: list[str]) -> None:
        super().__init__(
            f"job {job.id} missed its gates: {'; '.join(failures) or 'see the report'}"
        )
        self.job, self.failures = job, failures


class WaitTimeout(PruneryError):
    def __init__(self, job: Job, timeout: float) -> None:
        super().__init__(f"job {job.id} still {job.status} after {timeout:.0f} s")
        self.job = job
