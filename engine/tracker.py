"""Progress and stage timings of one pipeline run.

`progress(stage, fraction, message)` gets the overall fraction (each stage owns a slice of
the bar, recovery the largest); raising `core.errors.Cancelled` from it stops the run
between steps. `Tracker()` without a callback only keeps the timings (tests, benchmarks).
"""

from __future__ import annotations

import time
from collections.abc import Callable

ProgressFn = Callable[[str, float, str | None], None]
StageProgress = Callable[[float, str | None], None]

# Share of the overall progress bar per stage (recovery dominates).
STAGES = {
    "load": (0.00, 0.05),
    "analyse": (0.05, 0.12),
    "prune": (0.12, 0.35),
    "recover": (0.35, 0.85),
    "export": (0.85, 0.88),
    "verify": (0.88, 0.99),
    "report": (0.99, 1.00),
}


class Tracker:
    def __init__(self, progress: ProgressFn | None = None) -> None:
        self.progress = progress
        self.timings: dict[str, float] = {}
        self.stage = "load"
        self.t0 = time.perf_counter()

    def report(self, stage: str, fraction: float, message: str | None = None) -> None:
        lo, hi = STAGES[stage]
        if self.progress is not None:
            self.progress(stage, lo + (hi - lo) * min(max(fraction, 0.0), 1.0), message)

    def sink(self, stage: str) -> StageProgress:
        """`fn(fraction, message)` for one stage (what methods and helpers call)."""

        def report(fraction: float, message: str | None = None) -> None:
            self.report(stage, fraction, message)

        return report

    def _close(self) -> None:
        now = time.perf_counter()
        self.timings[self.stage] = round(self.timings.get(self.stage, 0.0) + now - self.t0, 3)
        self.t0 = now

    def begin(self, stage: str) -> None:
        self._close()
        self.stage = stage
        self.report(stage, 0.0, f"{stage}…")

    def finish(self) -> dict[str, float]:
        """The seconds per stage so far (the current stage closed)."""
        self._close()
        return self.timings
