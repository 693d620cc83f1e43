"""The producer (core.broker), the lazily built worker app and the run's outcome table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from core.errors import BadModel, Cancelled
from core.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def test_wire_names_are_kept() -> None:
    # Messages in flight during a rolling deploy carry these names.
    from core import broker

    assert (broker.RUN_JOB, broker.REAP, broker.ANALYZE, broker.DELIVER_WEBHOOKS) == (
        "workers.tasks.run_job",
        "workers.tasks.reap",
        "workers.side_tasks.analyze_model",
        "workers.side_tasks.deliver_webhooks",
    )


def test_importing_the_worker_has_no_side_effects(tmp_path: Path) -> None:
    env = {**os.environ, "PRUNERY_HOME": str(tmp_path / "home")}
    code = (
        "import sys, worker.celery_app, worker.tasks, worker.side_tasks\n"
        "assert 'fastapi' not in sys.modules and 'torch' not in sys.modules\n"
        "assert 'app' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, check=True)
    assert not (tmp_path / "home").exists()


def test_celery_finds_the_app_with_every_task(tmp_path: Path) -> None:
    from celery.app.utils import find_app

    from worker import celery_app

    celery_app.get_app.cache_clear()
    os.environ["PRUNERY_HOME"] = str(tmp_path)
    try:
        app = find_app("worker.celery_app")
        app.loader.import_default_modules()
        names = {n for n in app.tasks if n.startswith("workers.")}
        assert names == {
            "workers.tasks.run_job",
            "workers.tasks.reap",
            "workers.side_tasks.analyze_model",
            "workers.side_tasks.deliver_webhooks",
        }
        assert app.tasks["workers.tasks.run_job"].Request == "worker.resilience:JobRequest"
        assert (tmp_path / "broker" / "queue").is_dir()  # created when the app is built
    finally:
        celery_app.get_app.cache_clear()
        del os.environ["PRUNERY_HOME"]


def test_producer_routes(tmp_path: Path) -> None:
    from core.broker import make_producer

    settings = Settings(environment="test", broker_folder=tmp_path, job_queue="g")
    app = make_producer(settings)
    assert app.conf.task_routes["workers.tasks.run_job"] == {"queue": "g"}
    assert app.conf.task_ignore_result


def test_outcome_table() -> None:
    from celery.exceptions import SoftTimeLimitExceeded

    from worker.heartbeat import LostOwnership
    from worker.runner import InputMissing, outcome_of

    s = Settings(environment="test", job_soft_time_limit_s=60)
    assert outcome_of(LostOwnership("x"), s).status == "lost"
    cancelled = outcome_of(Cancelled("x"), s)
    assert (cancelled.status, cancelled.event) == ("cancelled", "cancelled while running")
    bad = outcome_of(BadModel("no good"), s)
    assert (bad.result, bad.code, bad.detail, bad.event, bad.keep_partial) == (
        "failed: bad_model",
        "bad_model",
        "no good",
        "bad_model: no good",
        True,
    )
    assert outcome_of(InputMissing("k"), s).code == "input_missing"
    assert "time limit of 60 s" in outcome_of(SoftTimeLimitExceeded(), s).detail
    crash = outcome_of(ValueError("boom"), s)
    assert (crash.code, crash.keep_traceback) == ("internal_error", True)
    assert crash.detail.startswith("the engine crashed (ValueError: boom)")
