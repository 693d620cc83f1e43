"""core tier: the torch-free shared layer in-process, on SQLite and on the real Postgres
(each schema built by the Alembic migrations). The Postgres half is marked `service`."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))

import servicekit  # noqa: E402

SCHEMA = "prunery_core_test"


def _postgres_url() -> str:
    import psycopg

    try:
        psycopg.connect(servicekit.PG_URL.replace("postgresql+psycopg", "postgresql")).close()
    except Exception as exc:  # noqa: BLE001
        message = f"Postgres is not reachable at {servicekit.PG_URL} ({exc})"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return servicekit.fresh_schema(SCHEMA)


@pytest.fixture(
    scope="module",
    params=["sqlite", pytest.param("postgres", marks=pytest.mark.service)],
)
def factory(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """A sessionmaker on a freshly migrated database."""
    from core.db import make_engine, make_sessionmaker, migrate
    from core.settings import Settings

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('core') / 'prunery.db'}"
    else:
        url = _postgres_url()
    settings = Settings(environment="test", database_url=url)
    migrate(settings)
    engine = make_engine(settings)
    yield make_sessionmaker(engine)
    engine.dispose()
