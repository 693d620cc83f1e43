"""Settings: one pydantic-settings class, read from `PRUNERY_*` environment variables.

The defaults are the embedded single-machine setup (SQLite, a local artifact directory,
kombu's filesystem transport); `prunery serve` fills them in. A deployment sets
`PRUNERY_ENVIRONMENT=production`, and then the unsafe defaults are refused.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from prunery.types import prunery_home


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PRUNERY_", extra="ignore")

    environment: Literal["development", "test", "production"] = "development"

    # --- persistence
    database_url: str = Field(
        default_factory=lambda: f"sqlite:///{prunery_home() / 'prunery.db'}",
        description="SQLAlchemy URL; postgresql+psycopg://... in deployment.",
    )
    database_pool_size: int = 10
    database_max_overflow: int = 20

    # --- broker
    broker_url: str = Field(
        default="filesystem://",
        description="Celery broker: redis://host:6379/0 in deployment, filesystem:// embedded.",
    )
    broker_folder: Path = Field(
        default_factory=lambda: prunery_home() / "broker",
        description="Folder of kombu's filesystem transport (only for filesystem://).",
    )
    job_queue: str = Field(default="gpu", description="Queue that run_job tasks are routed to.")
    control_queue: str = Field(default="control", description="Queue of the reaper task.")

    # --- storage
    storage_backend: Literal["local", "s3"] = "local"
    storage_dir: Path = Field(default_factory=lambda: prunery_home() / "artifacts")
    s3_bucket: str | None = None
    s3_prefix: str = ""
    s3_endpoint_url: str | None = Field(default=None, description="e.g. http://minio:9000")
    s3_region: str | None = None
    worker_cache_dir: Path = Field(
        default_factory=lambda: prunery_home() / "worker-cache",
        description="Where a worker keeps local copies of inputs fetched from S3.",
    )

    # --- limits
    max_model_bytes: int = 2 * 1024**3
    max_dataset_bytes: int = 4 * 1024**3
    max_active_jobs_per_tenant: int = Field(
        default=100, description="queued+running jobs one tenant may have; more → 429."
    )
    rate_limit_per_minute: int = Field(
        default=6000, description="Requests per API key per minute (in-process); 0 disables."
    )
    page_size_max: int = 200
    max_dataset_decoded_bytes: int = Field(
        default=4 * 1024**3,
        description="Declared decoded size of a dataset (npy headers, image headers × float32).",
    )
    max_image_pixels: int = Field(
        default=4096 * 4096, description="Pixels per image of an archive, read from its header."
    )

    # --- abuse control (see README "Hardening"); 0 disables a limit
    upload_idle_timeout_s: float = Field(
        default=30.0, description="An upload that sends nothing for this long is cut off (408)."
    )
    upload_max_duration_s: float = Field(
        default=3600.0, description="An upload still arriving after this long is cut off (408)."
    )
    max_concurrent_uploads_per_tenant: int = Field(
        default=4, description="Uploads in flight per tenant and API process; more → 429."
    )
    max_concurrent_streams_per_tenant: int = Field(
        default=20, description="Open /events streams per tenant and API process; more → 429."
    )
    max_stream_duration_s: float = Field(
        default=3600.0, description="An /events stream is closed after this long (clients resume)."
    )
    max_queued_jobs_per_tenant: int = Field(
        default=20,
        description="Queued jobs per tenant, counting jobs cancelled before they started in the "
        "last 10 minutes (their messages may still be in the broker): submit+cancel churn → 429.",
    )
    uploads_per_hour_per_tenant: int = Field(default=200, description="Model+dataset uploads.")
    storage_quota_bytes_per_tenant: int = Field(
        default=50 * 1024**3, description="Models + datasets + artifacts a tenant may store."
    )
    artifact_retention_days: float = Field(
        default=0.0, description="Finished jobs' artifacts are deleted after this (0: keep)."
    )
    failed_auth_per_minute: int = Field(
        default=60, description="Requests with a bad API key per client address per minute."
    )
    rate_limit_storage_url: str | None = Field(
        default=None,
        description="`limits` storage shared by API processes (redis://...); default: the broker "
        "when it is Redis, else process memory.",
    )
    metrics_enabled: bool = Field(default=True, description="Serve /metrics.")
    metrics_token: str | None = Field(
        default=None,
        description="When set, /metrics needs 'Authorization: Bearer <token>'. Production "
        "serves /metrics only with a token.",
    )
    forwarded_allow_ips: str = Field(
        default="127.0.0.1",
        description="Proxies whose X-Forwarded-For is trusted (uvicorn --forwarded-allow-ips).",
    )
    cancel_grace_s: float = Field(
        default=15.0,
        description="A running job that has not stopped this long after a cancel is killed; "
        "cancel lands within heartbeat_interval_s + cancel_grace_s.",
    )

    # --- job execution
    job_soft_time_limit_s: int = Field(
        default=6 * 3600, description="The engine is asked to stop (SoftTimeLimitExceeded)."
    )
    job_hard_time_limit_s: int = Field(
        default=6 * 3600 + 300, description="The worker child is killed after this."
    )
    heartbeat_interval_s: float = Field(default=10.0, description="Worker heartbeat period.")
    heartbeat_timeout_s: float = Field(
        default=120.0, description="A running job whose heartbeat is older is presumed lost."
    )
    reaper_interval_s: float = Field(default=30.0, description="How often the reaper runs.")
    requeue_queued_after_s: float = Field(
        default=600.0,
        description="A queued job not picked up for this long is re-published (broker lost it).",
    )
    max_attempts: int = Field(
        default=3, description="Runs per job before a lost worker fails the job for good."
    )
    worker_max_tasks_per_child: int = Field(
        default=1, description="Recycle the pool child after this many jobs (0: never)."
    )
    worker_preload_engine: bool = Field(
        default=True, description="Import the engine in the worker parent so children fork warm."
    )
    progress_min_interval_s: float = Field(
        default=0.5, description="Throttle of progress writes to the database."
    )
    latency_threads: int | None = Field(
        default=None,
        ge=0,
        description="onnxruntime intra-op threads the worker times latency with (one-op "
        "profiles, whole-network choices, the report). null: 1, the engine's default (two "
        "sessions' thread pools timed alternately compete, so multi-threaded ratios of small "
        "models are noise); 0: onnxruntime's default, one per core; N: N threads.",
    )

    # --- SSE
    events_poll_interval_s: float = 0.5
    events_keepalive_s: float = 15.0

    @model_validator(mode="after")
    def _refuse_unsafe_defaults(self) -> Settings:
        if self.environment != "production":
            return self
        problems = []
        if self.database_url.startswith("sqlite"):
            problems.append("PRUNERY_DATABASE_URL must point at Postgres, not SQLite")
        if self.broker_url.startswith(("filesystem", "memory")):
            problems.append("PRUNERY_BROKER_URL must be a real broker (redis://...)")
        if self.storage_backend == "s3" and not self.s3_bucket:
            problems.append("PRUNERY_S3_BUCKET is required with PRUNERY_STORAGE_BACKEND=s3")
        problems.extend(_default_credentials(self))
        forwarded = {ip.strip() for ip in self.forwarded_allow_ips.split(",")}
        env_forwarded = os.environ.get("FORWARDED_ALLOW_IPS", "")
        if "*" in forwarded or "*" in {ip.strip() for ip in env_forwarded.split(",")}:
            problems.append(
                "forwarded IPs must name your proxies, not '*' (anyone could spoof "
                "X-Forwarded-For and dodge per-address limits)"
            )
        if problems:
            raise ValueError("unsafe production settings: " + "; ".join(problems))
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


# Passwords that ship in examples and compose files; production refuses them.
DEFAULT_PASSWORDS = frozenset(
    {"prunery", "prunery-secret", "postgres", "password", "changeme", "minioadmin", "secret"}
)


def _default_credentials(settings: Settings) -> list[str]:
    from sqlalchemy.engine import make_url

    problems = []
    try:
        url = make_url(settings.database_url)
        if url.password is None or str(url.password) in DEFAULT_PASSWORDS:
            problems.append(
                "PRUNERY_DATABASE_URL has no password or a default one; set POSTGRES_PASSWORD"
            )
    except Exception:
        problems.append("PRUNERY_DATABASE_URL is not a valid SQLAlchemy URL")
    if settings.storage_backend == "s3":
        secret = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
        if secret in DEFAULT_PASSWORDS:
            problems.append("AWS_SECRET_ACCESS_KEY is a default; set a real secret")
    return problems


@lru_cache
def get_settings() -> Settings:
    return Settings()
