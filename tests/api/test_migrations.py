"""Alembic is the only source of the schema: it builds it, matches the ORM, and reverses."""

from __future__ import annotations

import pytest
import servicekit


@pytest.fixture()
def scratch_settings(base_settings):
    url = servicekit.fresh_schema("prunery_migration_test")
    return base_settings.model_copy(update={"database_url": url})


def test_upgrade_matches_the_orm_and_downgrades(scratch_settings):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlalchemy import create_engine, inspect

    from core.db import downgrade, migrate
    from core.orm import Base

    migrate(scratch_settings)
    engine = create_engine(scratch_settings.database_url)
    with engine.connect() as conn:
        tables = set(inspect(conn).get_table_names())
        assert {
            "tenants",
            "api_keys",
            "models",
            "datasets",
            "jobs",
            "job_events",
            "alembic_version",
        } <= tables
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == [], diff
    downgrade(scratch_settings, "base")
    with engine.connect() as conn:
        assert set(inspect(conn).get_table_names()) == {"alembic_version"}
    migrate(scratch_settings)
    engine.dispose()


def test_migrations_also_build_sqlite(tmp_path, base_settings):
    from sqlalchemy import create_engine, inspect

    from core.db import migrate

    settings = base_settings.model_copy(update={"database_url": f"sqlite:///{tmp_path / 'p.db'}"})
    migrate(settings)
    engine = create_engine(settings.database_url)
    assert "job_events" in inspect(engine).get_table_names()
    engine.dispose()
