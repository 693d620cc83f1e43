"""A run's link to its job row while the engine works: the engine's progress callback and
a heartbeat thread, both writing through `core.jobs.lifecycle.heartbeat`.

Either one notices when the user asks to cancel (the row says `cancelling`) or when the
reaper gave the job to another run (the row's run_token changed); the next progress call
then raises `Cancelled` or `LostOwnership`. An engine stage that never reports progress is
hard-stopped by the heartbeat thread `cancel_grace_s` after the request.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.db import transaction
from core.errors import Cancelled
from core.jobs import lifecycle
from core.orm import Job
from worker.resilience import hard_stop, is_transient
from worker.runtime import Runtime

log = logging.getLogger("prunery.worker")


class LostOwnership(Cancelled):
    """The reaper gave this job to another run; this one must stop without writing."""


class JobReporter:
    """The engine's progress callback plus a heartbeat thread, both writing to the row.

    `on_hard_stop` writes the final `cancelled` state when the engine ignores a cancel."""

    def __init__(
        self,
        rt: Runtime,
        job_id: str,
        token: str,
        workdir: Path | None = None,
        on_hard_stop: Callable[[str], object] | None = None,
    ) -> None:
        self.rt, self.job_id, self.token, self.workdir = rt, job_id, token, workdir
        self.on_hard_stop = on_hard_stop
        self._cancel_seen: float | None = None
        self.cancel = threading.Event()
        self.lost = threading.Event()
        self.stop = threading.Event()
        self._last_write = 0.0
        self._last_event_progress = -1.0
        self._stage: str | None = None
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> JobReporter:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self._thread.join(timeout=5)

    def _note(self, status: str | None) -> None:
        if status is None:
            self.lost.set()
        elif status == "cancelling":
            self.cancel.set()

    def _touch(self) -> None:
        with transaction(self.rt.factory) as s:
            self._note(lifecycle.heartbeat(s, self.job_id, self.token))

    def _beat(self) -> None:
        while not self.stop.wait(self.rt.settings.heartbeat_interval_s):
            try:
                self._touch()
            except Exception:  # the database may blip; the next beat retries
                log.exception("heartbeat for %s failed", self.job_id)
            if self.cancel.is_set() and not self.stop.is_set():
                self._maybe_hard_stop()

    def _maybe_hard_stop(self) -> None:
        # A stage that never reports progress cannot see the cancel.
        self._cancel_seen = self._cancel_seen or time.monotonic()
        grace = self.rt.settings.cancel_grace_s
        if time.monotonic() - self._cancel_seen < grace:
            return
        note = (
            f"cancelled: the engine did not stop within {grace:g} s of the "
            "request, so its process was terminated"
        )
        on_stop = self.on_hard_stop
        hard_stop(self.workdir, lambda: on_stop(note) if on_stop else None)

    def check(self) -> None:
        if self.lost.is_set():
            raise LostOwnership("another run owns this job now")
        if self.cancel.is_set():
            raise Cancelled("cancelled by the user")

    def __call__(self, stage: str, fraction: float, message: str | None = None) -> None:
        self.check()
        now = time.monotonic()
        fraction = min(1.0, max(0.0, float(fraction)))
        new_stage = stage != self._stage
        interval = self.rt.settings.progress_min_interval_s
        # Stage changes are always written; log lines at most 5x as often as plain progress,
        # so an engine that reports every batch cannot flood the database.
        since = now - self._last_write
        if not (new_stage or since >= interval or (message and since >= interval / 5)):
            return
        self._last_write = now
        self._stage = stage
        try:
            self._write(stage, fraction, message, new_stage)
        except Exception as exc:
            if not is_transient(exc):
                raise
            # Progress is best effort: a database blip must not fail the job. The heartbeat
            # thread keeps trying, and the next progress call writes again.
            log.warning("job %s: progress write failed; continuing", self.job_id, exc_info=True)
            self._stage = None
        self.check()

    def _write(self, stage: str, fraction: float, message: str | None, new_stage: bool) -> None:
        with transaction(self.rt.factory) as s:
            status = lifecycle.heartbeat(
                s,
                self.job_id,
                self.token,
                stage=stage,
                progress=fraction,
                message=message if message else Job.message,
            )
            self._note(status)
            # Events: every stage change and message, and each 1% of progress.
            if status is not None and (
                new_stage or message or fraction - self._last_event_progress >= 0.01
            ):
                self._last_event_progress = fraction
                job = Job(id=self.job_id, status=status, stage=stage, progress=fraction)
                lifecycle.add_event(s, job, "log" if message else "progress", message or stage)
