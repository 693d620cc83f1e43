"""`prunery jobs` as a table: what each job is (method, target, model) and when it ran;
`prunery methods` as wrapped text.

The job JSON (`GET /v1/jobs`) carries the model's file name (`model_name`) and the method that
ran (`method`: auto's choice once the report is written); from an older server without them the
names come from one `GET /v1/models/{id}` per distinct model of the page (a deleted model keeps
its id).
"""

from __future__ import annotations

import shutil
import textwrap
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from prunery.client import Client, Job
from prunery.errors import APIError

MAX_NAME_LOOKUPS = 20


def model_names(client: Client, jobs: Sequence[Job]) -> dict[str, str]:
    """{model id: uploaded file name} for the models of `jobs` (at most MAX_NAME_LOOKUPS)."""
    names: dict[str, str] = {}
    for j in jobs:
        carried = getattr(j, "model_name", None)
        if j.model_id and isinstance(carried, str):
            names[j.model_id] = carried
    ids = [
        m
        for m in dict.fromkeys(j.model_id for j in jobs if j.model_id)
        if m not in names and not _server_sent_name(jobs, m)
    ]
    for model_id in ids[:MAX_NAME_LOOKUPS]:
        try:
            names[model_id] = client.models.get(model_id).filename
        except APIError:  # deleted, or not visible: the id is shown instead
            continue
    return names


def _server_sent_name(jobs: Sequence[Job], model_id: str) -> bool:
    """The server sent a `model_name` (even null) for this model: a lookup would add nothing."""
    return any(j.model_id == model_id and "model_name" in (j.model_extra or {}) for j in jobs)


def _method(spec: dict[str, Any], ran: Any = None) -> str:
    if isinstance(ran, str) and ran:
        asked = spec.get("method")
        asked_name = asked.get("name") if isinstance(asked, dict) else asked
        return f"auto → {ran}" if asked_name == "auto" and ran != "auto" else ran
    method = spec.get("method")
    if isinstance(method, dict):
        return str(method.get("name") or "-")
    return str(method or "-")


def _target(spec: dict[str, Any]) -> str:
    target = spec.get("target")
    if not isinstance(target, dict):
        return "-"
    for key, word in (("flops", "MACs"), ("params", "params"), ("latency", "latency")):
        if target.get(key) is not None:
            value = target[key]
            if isinstance(value, list):  # a budget sweep
                return f"{word} " + ",".join(f"{v:g}" for v in value)
            return f"{word} {value:g}"
    if target.get("layers"):
        return f"{len(target['layers'])} layers"
    return "-"


def _seconds(seconds: float) -> str:
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


def _duration(job: Job, now: datetime) -> str:
    if job.started_at is None:
        return "-"
    if job.finished_at is not None:
        return _seconds((job.finished_at - job.started_at).total_seconds())
    if job.done:
        return "-"
    return f"{_seconds((now - job.started_at).total_seconds())} so far"


def _status(job: Job) -> str:
    if job.status == "failed" and job.error is not None:
        return f"failed ({job.error.error})"
    if job.gates_passed is False:
        return f"{job.status}, gate missed"
    return str(job.status)


def _progress(job: Job) -> str:
    pct = f"{job.progress * 100:.0f}%"
    return f"{pct} {job.stage}" if job.stage and not job.done else pct


def _local(at: datetime) -> str:
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at.astimezone().strftime("%Y-%m-%d %H:%M")


def job_row(job: Job, names: dict[str, str], now: datetime) -> tuple[str, ...]:
    model = names.get(job.model_id or "", job.model_id or "-")
    return (
        job.id,
        _status(job),
        _progress(job),
        _method(job.spec, getattr(job, "method", None)),
        _target(job.spec),
        model,
        _local(job.created_at),
        _duration(job, now),
    )


HEADER = ("id", "status", "progress", "method", "target", "model", "created", "ran for")


def jobs_table(
    jobs: Sequence[Job], count: int, names: dict[str, str], now: datetime | None = None
) -> str:
    """One row per job, newest first as the server lists them, and how many there are."""
    if not jobs:
        return "no jobs"
    now = now or datetime.now(UTC)
    rows = [HEADER, *(job_row(j, names, now) for j in jobs)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    errors = [(j.id, j.error) for j in jobs if j.status == "failed" and j.error is not None]
    if errors:
        lines.append("")
        lines += [f"{job_id} failed: {e.error}: {e.detail}" for job_id, e in errors]
    if count > len(jobs):
        lines.append(f"({len(jobs)} of {count} jobs; --limit N shows more, --json has every field)")
    return "\n".join(lines)


def methods_text(methods: Sequence[tuple[str, str, str]], width: int | None = None) -> str:
    """`prunery methods`: each (name, summary, paper), the summary and paper wrapped beside
    the name column to the terminal's width."""
    width = width or shutil.get_terminal_size((100, 24)).columns
    col = max((len(name) for name, _, _ in methods), default=0) + 2
    body = max(40, width - col)
    out = []
    for name, summary, paper in methods:
        text = textwrap.wrap(summary, body) + textwrap.wrap(f"({paper})", body)
        out.append(name.ljust(col) + (text[0] if text else ""))
        out += [" " * col + line for line in text[1:]]
    return "\n".join(out)
