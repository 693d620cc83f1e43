"""Names the client, the CLI, the API and the worker must agree on — defined once, here.

Torch-free and server-free: the SDK ships it, the server imports it.
"""

from __future__ import annotations

import os
from enum import IntEnum
from pathlib import Path
from typing import Literal, get_args

JobStatus = Literal["queued", "running", "cancelling", "succeeded", "failed", "cancelled"]
JOB_STATUSES: tuple[str, ...] = get_args(JobStatus)
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
ACTIVE: frozenset[str] = frozenset({"queued", "running", "cancelling"})

# Every successful job has these; a method or the export may add more (model.pt2,
# search_curves.png): the job's `artifacts` lists what it really has.
ARTIFACT_NAMES: tuple[str, ...] = (
    "model.onnx",
    "report.json",
    "report.md",
    "report.html",
    "analysis.json",
)


class ExitCode(IntEnum):
    """Exit status of every `prunery` command (local `prune` and remote `submit` alike)."""

    OK = 0
    BAD_INPUT = 2
    JOB_FAILED = 3
    GATE_MISSED = 4
    CANCELLED = 5
    TIMEOUT = 6


def prunery_home() -> Path:
    """Where Prunery keeps local state (embedded server's data, credentials): $PRUNERY_HOME
    or ~/.prunery."""
    return Path(os.environ.get("PRUNERY_HOME") or Path.home() / ".prunery")
