"""Per-process resources of a worker: settings, database sessions, storage, a publisher.

Created lazily after fork (never inherited from the main process: `reset` runs in each
pool child), so a child never shares its parent's database sockets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from core.broker import make_producer
from core.db import make_engine, make_sessionmaker
from core.settings import Settings, get_settings
from core.storage import Storage, make_storage


@dataclass
class Runtime:
    settings: Settings
    factory: sessionmaker[Session]
    storage: Storage
    _producer: Celery | None = field(default=None, repr=False)

    @cached_property
    def producer(self) -> Celery:
        """Publishes tasks (the reaper's re-queues), built on first use."""
        return self._producer or make_producer(self.settings)


_runtime: Runtime | None = None


def runtime() -> Runtime:
    """This process's runtime (created on first use)."""
    global _runtime
    if _runtime is None:
        settings = get_settings()
        _runtime = Runtime(
            settings, make_sessionmaker(make_engine(settings)), make_storage(settings)
        )
    return _runtime


def reset() -> None:
    """Forget the runtime (after fork: the child builds its own)."""
    global _runtime
    _runtime = None
