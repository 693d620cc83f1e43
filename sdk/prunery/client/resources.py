"""What the API returns, as pydantic models — shared by the sync and the async client.

`JobData` is a job's fields; `Job` (sync) and `AsyncJob` (async) add the network methods,
each bound to its own client.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from pydantic import BaseModel, ConfigDict

from prunery.errors import JobCancelled, JobFailed
from prunery.report import SWEEP_SEPARATOR, sweep_artifact_name
from prunery.types import TERMINAL, JobStatus


class _Resource(BaseModel):
    model_config = ConfigDict(extra="allow")


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


class JobData(_Resource):
    """A job's fields (no network): what `Job` and `AsyncJob` share."""

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
    def done(self) -> bool:
        return self.status in TERMINAL

    def _update(self, other: JobData) -> None:
        for name in JobData.model_fields:
            setattr(self, name, getattr(other, name))

    def sweep_artifacts(
        self, point: str | float, files: Sequence[str] = ("model.onnx",)
    ) -> list[str]:
        """The artifact names of one point of a budget sweep (`target.flops: [0.75, 0.5]`),
        by label (`"flops-0.5"`) or fraction (`0.5`): `job.download("out/",
        job.sweep_artifacts(0.5))` fetches that point's model (`files` picks others, e.g.
        `("model.onnx", "report.json")`). The report's `sweep` lists every point."""
        points = sorted(
            {n.split(SWEEP_SEPARATOR, 1)[0] for n in self.artifacts if SWEEP_SEPARATOR in n}
        )
        if isinstance(point, str):
            label = point if point in points else None
        else:
            label = next((lab for lab in points if _point_value(lab) == float(point)), None)
        if label is None:
            raise ValueError(
                f"job {self.id} has no sweep point {point!r}"
                + (f"; its points are {', '.join(points)}" if points else " (it is not a sweep)")
            )
        names = [sweep_artifact_name(label, f) for f in files]
        missing = [n for n in names if n not in self.artifacts]
        if missing:
            raise ValueError(f"job {self.id} has no artifact {', '.join(missing)}")
        return names

    def _raise_if_ended_badly(self) -> None:
        if self.status == "cancelled":
            raise JobCancelled(self)
        if self.status == "failed":
            raise JobFailed(self)


def _point_value(label: str) -> float | None:
    """`flops-0.5` -> 0.5."""
    try:
        return float(label.split("-", 1)[1])
    except (IndexError, ValueError):
        return None


class Page(BaseModel):
    data: list[Any]
    count: int


class ProgressBar:
    """A dependency-free text progress bar on stderr."""

    def __init__(self, job_id: str, width: int = 30, stream: TextIO | None = None) -> None:
        self.job_id, self.width = job_id, width
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last = ""

    def update(self, job: JobData) -> None:
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


def parse_sse(lines: Iterable[str]) -> Iterator[JobEvent | None]:
    """Server-sent events → JobEvents; yields None at the `end` event (stop reading)."""
    kind: str | None = None
    data: list[str] = []
    for line in lines:
        if line == "":
            if kind not in (None, "end") and data:
                yield JobEvent.model_validate_json("\n".join(data))
            if kind == "end":
                yield None
                return
            kind, data = None, []
        elif line.startswith("event:"):
            kind = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


def safe_names(names: Sequence[str]) -> list[str]:
    """Artifact names are plain file names; refuse anything that would write elsewhere."""
    for name in names:
        if not name or Path(name).name != name or name.startswith("."):
            raise ValueError(f"refusing to download an artifact named {name!r}")
    return list(names)
