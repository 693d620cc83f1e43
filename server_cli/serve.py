"""`prunery serve`: the embedded default — the API and a Celery worker on one machine, with
no servers to install: SQLite, a local artifact directory and kombu's filesystem transport.

It runs the same app and the same task code as a deployment; only settings differ (any
PRUNERY_* variable set in the environment wins over the embedded defaults). It prints the
URL and an API key and writes both to $PRUNERY_HOME/credentials.json (default
~/.prunery/), where the SDK and the CLI find them.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from prunery.cli.plugins import Command
from prunery.types import prunery_home

if TYPE_CHECKING:
    from core.settings import Settings


def _embedded_env(home: Path) -> None:
    defaults = {
        "PRUNERY_HOME": str(home),
        "PRUNERY_DATABASE_URL": f"sqlite:///{home / 'prunery.db'}",
        "PRUNERY_BROKER_URL": "filesystem://",
        "PRUNERY_BROKER_FOLDER": str(home / "broker"),
        "PRUNERY_STORAGE_BACKEND": "local",
        "PRUNERY_STORAGE_DIR": str(home / "artifacts"),
        "PRUNERY_WORKER_CACHE_DIR": str(home / "worker-cache"),
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


def _ensure_key(settings: Settings, url: str, creds_path: Path) -> str:
    from app.security import create_api_key, get_or_create_tenant, lookup_key
    from core.db import make_engine, make_sessionmaker, transaction

    engine = make_engine(settings)
    factory = make_sessionmaker(engine)
    try:
        old = json.loads(creds_path.read_text()) if creds_path.is_file() else {}
    except ValueError:
        old = {}
    with transaction(factory) as s:
        key = old.get("api_key")
        if not key or lookup_key(s, key) is None:
            tenant = get_or_create_tenant(s, "local")
            _row, key = create_api_key(s, tenant, "prunery serve")
    engine.dispose()
    creds_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = creds_path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"url": url, "api_key": key}, indent=2) + "\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, creds_path)
    return key


def start_worker(
    home: Path, log_path: Path, queues: str = "gpu,control", concurrency: int = 1
) -> subprocess.Popen[bytes]:
    """A Celery worker (with the reaper's beat embedded) in its own process group."""
    log = open(log_path, "ab")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "worker.celery_app",
            "worker",
            "-Q",
            queues,
            "-c",
            str(concurrency),
            "-B",
            "-s",
            str(home / "celerybeat-schedule"),
            "-n",
            f"prunery-{os.getpid()}@%h",
            "--loglevel",
            "INFO",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=os.environ.copy(),
    )


def stop_process_group(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """Stop the worker and everything in its process group: Celery's main process can exit
    before its pool child and the embedded beat have, so wait for the *group* to be gone
    (SIGTERM, then SIGKILL after `timeout`), not only for the process we started."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=timeout)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            _kill_group(proc.pid)
            proc.wait(timeout=5)
    if not _group_gone(proc.pid, timeout):
        _kill_group(proc.pid)
        _group_gone(proc.pid, 5.0)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _group_gone(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # the id was reused by someone else's group: ours is gone
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=os.environ.get("PRUNERY_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PRUNERY_PORT", "8000")))
    parser.add_argument(
        "--home", type=Path, help="state directory (default $PRUNERY_HOME or ~/.prunery)"
    )
    parser.add_argument("--no-worker", action="store_true", help="run only the API")


def run(args: argparse.Namespace) -> int:
    home = (args.home or prunery_home()).resolve()
    home.mkdir(parents=True, exist_ok=True)
    _embedded_env(home)

    import uvicorn

    from app.main import create_app
    from core.db import migrate
    from core.settings import get_settings

    get_settings.cache_clear()
    settings = get_settings()
    migrate(settings)
    url = f"http://{args.host}:{args.port}"
    creds_path = home / "credentials.json"
    key = _ensure_key(settings, url, creds_path)

    worker = None
    if not args.no_worker:
        worker = start_worker(home, home / "worker.log")
    print(f"Prunery is serving at {url}  (API docs: {url}/docs)", flush=True)
    print(f"API key: {key}", flush=True)
    print(f"credentials written to {creds_path} (the prunery CLI and SDK read them)", flush=True)
    if worker:
        print(f"worker pid {worker.pid}, log {home / 'worker.log'}", flush=True)

    def _terminate(signum: int, _frame: object) -> None:
        # uvicorn re-raises SIGTERM after its graceful shutdown; turning it into an
        # exception lets the `finally` below stop the worker too.
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    try:
        uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="warning")
    except KeyboardInterrupt:
        pass
    finally:
        if worker:
            stop_process_group(worker)
    return 0


COMMAND = Command(
    help="run the embedded server (API + worker); `prunery serve --help`",
    description=__doc__,
    configure=configure,
    run=run,
)


def main(argv: list[str] | None = None) -> int:
    return COMMAND.main("serve", argv)


if __name__ == "__main__":
    sys.exit(main())
