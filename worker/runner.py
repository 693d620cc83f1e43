"""One run of one job: claim it, fetch its inputs, call the engine, write the outcome.

How a run ends is one table, `OUTCOMES`: the first row whose exception type matches says
what the job becomes (its status, error code and detail, the event line, whether the
analysis of a failed run is kept, whether the traceback is kept for the operator). A run
that finishes without an exception is `succeeded` (with `gates_passed` telling whether it
met its gates). The engine is called in exactly one place, `_run_engine`.

Torch is imported only inside `_run_engine` (via the engine), never at module import.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from celery.exceptions import SoftTimeLimitExceeded

from core.db import transaction
from core.errors import Cancelled, EngineError
from core.jobs import lifecycle
from core.orm import JobEvent
from core.settings import Settings
from core.storage import job_prefix
from worker.heartbeat import JobReporter, LostOwnership
from worker.resilience import Unclaimable, is_transient, pid_alive, retry_transient, worker_id
from worker.runtime import Runtime

log = logging.getLogger("prunery.worker")

# What a failed run still publishes: the analysis of e.g. a `budget_unreachable` job, so
# its excluded layers (and the reasons) can be read.
PARTIAL_ARTIFACTS = ("analysis.json",)


class InputMissing(Exception):
    """A stored input file is gone (deleted from the bucket, a lost volume)."""


# ---------------------------------------------------------------- the outcome table


@dataclass(frozen=True)
class Outcome:
    result: str  # what the task returns (and logs)
    status: Literal["failed", "cancelled", "lost"]
    code: str = ""
    detail: str = ""
    event: str | None = None  # the state event's line (default: the detail)
    keep_partial: bool = False  # store PARTIAL_ARTIFACTS
    keep_traceback: bool = False  # store the traceback as a `debug` event


def _engine_error(exc: BaseException, _: Settings) -> Outcome:
    assert isinstance(exc, EngineError)
    event = f"{exc.code}: {exc.message}"
    return Outcome(f"failed: {exc.code}", "failed", exc.code, exc.message, event, True)


def _input_missing(exc: BaseException, _: Settings) -> Outcome:
    detail = f"an input file is missing from storage ({exc}); upload it again and resubmit"
    return Outcome("failed: input missing", "failed", "input_missing", detail)


def _time_limit(_: BaseException, settings: Settings) -> Outcome:
    detail = (
        f"the job ran past the time limit of {settings.job_soft_time_limit_s} s; "
        "ask for fewer epochs or raise PRUNERY_JOB_SOFT_TIME_LIMIT_S"
    )
    return Outcome("failed: time limit", "failed", "time_limit", detail)


def _crash(exc: BaseException, _: Settings) -> Outcome:
    detail = f"the engine crashed ({type(exc).__name__}: {exc}); this is a bug, please report it"
    return Outcome(
        "failed: internal error", "failed", "internal_error", detail[:2000], keep_traceback=True
    )


OUTCOMES: tuple[tuple[type[BaseException], Callable[[BaseException, Settings], Outcome]], ...] = (
    (LostOwnership, lambda e, s: Outcome("lost ownership", "lost")),
    (Cancelled, lambda e, s: Outcome("cancelled", "cancelled", event="cancelled while running")),
    (EngineError, _engine_error),
    (InputMissing, _input_missing),
    (SoftTimeLimitExceeded, _time_limit),
    (Exception, _crash),
)


def outcome_of(exc: BaseException, settings: Settings) -> Outcome:
    """The first row of `OUTCOMES` that matches `exc`."""
    for kind, make in OUTCOMES:
        if isinstance(exc, kind):
            return make(exc, settings)
    raise exc


# ---------------------------------------------------------------- writing the outcome


def finish(rt: Runtime, job_id: str, token: str, write: Callable[[Any, Any], None]) -> bool:
    """Call `write(session, job)` under the row lock if this run still owns the job, waiting
    out a database outage; False when the reaper gave the job to another run."""

    def once() -> bool:
        with transaction(rt.factory) as s:
            job = lifecycle.owned(s, job_id, token)
            if job is None:
                log.warning("job %s: this run lost ownership; its outcome is discarded", job_id)
                return False
            write(s, job)
        return True

    return retry_transient(
        once, f"finish {job_id}", budget_s=max(300.0, rt.settings.heartbeat_timeout_s)
    )


def _record(rt: Runtime, claim: lifecycle.Claim, job_id: str, outcome: Outcome, out: Path) -> str:
    if outcome.status == "lost":
        return outcome.result
    if outcome.keep_traceback:
        log.error("job %s crashed", job_id, exc_info=True)
        _keep_traceback(rt, job_id)
    if outcome.status == "cancelled":
        event = outcome.event or "cancelled"
        finish(rt, job_id, claim.token, lambda s, j: lifecycle.finish_cancelled(s, j, event))
        return outcome.result
    partial = None
    if outcome.keep_partial:
        prefix = job_prefix(claim.tenant_id, job_id)
        partial = store_outputs(rt, prefix, out, only=PARTIAL_ARTIFACTS, best_effort=True)
    o = outcome
    finish(
        rt,
        job_id,
        claim.token,
        lambda s, j: lifecycle.fail(
            s, j, o.code, o.detail, event=o.event or o.detail, artifacts=partial or None
        ),
    )
    return outcome.result


def _succeeded(rt: Runtime, claim: lifecycle.Claim, job_id: str, report: Any, out: Path) -> str:
    artifacts = store_outputs(rt, job_prefix(claim.tenant_id, job_id), out)
    missed = [f"{g.name}: {g.value:g} > limit {g.limit:g}" for g in report.gates if not g.passed]
    passed = bool(report.gates_passed)
    message = "succeeded" if passed else "succeeded, but gates missed: " + "; ".join(missed)
    finish(
        rt,
        job_id,
        claim.token,
        lambda s, j: lifecycle.succeed(
            s,
            j,
            report=report.model_dump(mode="json"),
            gates_passed=passed,
            artifacts=artifacts,
            message=message,
        ),
    )
    return "succeeded" if passed else "succeeded (gates missed)"


def _keep_traceback(rt: Runtime, job_id: str) -> None:
    """Store the traceback of an internal error for the operator, as a `debug` event: the
    public API never returns those (tenants see the one-line error);
    `python -m app.admin job-debug JOB_ID` prints it."""
    try:
        with transaction(rt.factory) as s:
            s.add(JobEvent(job_id=job_id, kind="debug", message=traceback.format_exc()[-20000:]))
    except Exception:  # noqa: BLE001 - the failure itself is recorded by the caller
        log.warning("job %s: could not store the traceback", job_id, exc_info=True)


# ---------------------------------------------------------------- the run


def claim(rt: Runtime, job_id: str) -> lifecycle.Claim | str:
    """Claim the job for this run, waiting out a database outage (it never costs the job an
    attempt); `Unclaimable` when the database stays unreachable."""

    def once() -> lifecycle.Claim | str:
        with transaction(rt.factory) as s:
            return lifecycle.claim(
                s,
                job_id,
                worker=worker_id(),
                heartbeat_timeout_s=rt.settings.heartbeat_timeout_s,
                alive=pid_alive,
            )

    try:
        return retry_transient(once, f"claim {job_id}")
    except Exception as exc:
        if is_transient(exc):
            raise Unclaimable(job_id) from exc
        raise


def execute(rt: Runtime, job_id: str) -> str:
    """Run job `job_id` to its end; a short line saying how it ended."""
    claimed = claim(rt, job_id)
    if isinstance(claimed, str):
        log.info("job %s: %s", job_id, claimed)
        return claimed
    runs = Path(rt.settings.worker_cache_dir) / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f"{job_id}-", dir=runs))
    out = workdir / "out"

    def hard_stopped(note: str) -> None:
        finish(rt, job_id, claimed.token, lambda s, j: lifecycle.finish_cancelled(s, j, note))

    try:
        with JobReporter(rt, job_id, claimed.token, workdir, hard_stopped) as reporter:
            try:
                report = _run_engine(rt, claimed, reporter, out)
                reporter.check()
            except Exception as exc:
                return _record(rt, claimed, job_id, outcome_of(exc, rt.settings), out)
            return _succeeded(rt, claimed, job_id, report, out)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run_engine(rt: Runtime, claim: lifecycle.Claim, reporter: JobReporter, out: Path) -> Any:
    """Fetch the inputs and call the engine (the one call into it)."""
    from engine import run as run_engine  # torch is imported here
    from methods import registry
    from prunery.spec import JobSpec

    inputs = Path(rt.settings.worker_cache_dir) / "inputs"
    spec = JobSpec.model_validate(claim.spec)
    model_path = _fetch(rt, claim.model[1], inputs / f"{claim.model[0]}{claim.model[2]}")
    data_path = _fetch(rt, claim.dataset[1], inputs / f"{claim.dataset[0]}{claim.dataset[2]}")
    reporter("load", 0.0, "inputs ready; starting the engine")
    out.mkdir()
    eval_path = None
    if claim.eval_dataset:
        ev_id, ev_key, ev_suffix = claim.eval_dataset
        eval_path = _fetch(rt, ev_key, inputs / f"{ev_id}{ev_suffix}")
    return run_engine(
        spec,
        model_path,
        data_path,
        out,
        progress=reporter,
        eval_data_path=eval_path,
        catalog=registry,
        latency_threads=rt.settings.latency_threads,
    )


# ---------------------------------------------------------------- files


def _fetch(rt: Runtime, key: str, dest: Path) -> Path:
    """A local path of a stored input (the local store's own file, or a downloaded copy)."""
    try:
        return rt.storage.get_file(key, dest)
    except FileNotFoundError:
        raise InputMissing(key) from None
    except Exception as exc:  # botocore's 404 is a ClientError
        if "404" in str(exc) or "Not Found" in str(exc):
            raise InputMissing(key) from None
        raise


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def store_outputs(
    rt: Runtime,
    prefix: str,
    out_dir: Path,
    only: tuple[str, ...] | None = None,
    best_effort: bool = False,
) -> dict[str, dict[str, Any]]:
    """Store every file the engine wrote to its output directory, under the same name
    `prunery prune` gives it (model.onnx, report.json, report.md, and whatever a method adds,
    e.g. search_curves.png): one code path for the CLI and the service. A failed run stores
    `only` what is worth reading (its analysis), `best_effort`: the failure is what matters."""
    artifacts: dict[str, dict[str, Any]] = {}
    if not out_dir.is_dir():
        return artifacts
    for path in sorted(out_dir.iterdir()):
        if only is not None and path.name not in only:
            continue
        if (
            not path.is_file()
            or path.is_symlink()
            or not lifecycle.ARTIFACT_NAME.fullmatch(path.name)
        ):
            log.warning("not storing %s: artifacts are plain files with simple names", path.name)
            continue
        try:
            key = f"{prefix}/{path.name}"
            entry: dict[str, Any] = {
                "key": key,
                "size": path.stat().st_size,
                "sha256": _sha256(path),
            }
            rt.storage.put_file(path, key)  # may move the file: measure it first
        except Exception:
            if not best_effort:
                raise
            log.exception("could not store %s", path.name)
            continue
        artifacts[path.name] = entry
    return artifacts
