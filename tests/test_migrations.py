"""The migrations build the schema the models describe, and go down and up again cleanly."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from tests.support import create_database, drop_database
from tuneforge.db import downgrade, migrate
from tuneforge.models.tables import metadata


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'migrations.db'}"
        return
    name, url = create_database("tf_migrations")
    try:
        yield url
    finally:
        drop_database(name)


def _schema_diff(url: str) -> list[object]:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return list(compare_metadata(context, metadata))
    finally:
        engine.dispose()


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade_matches_models(empty_database: str) -> None:
    url = empty_database
    migrate(url)
    assert _schema_diff(url) == []
    assert {t.name for t in metadata.sorted_tables} <= _tables(url)

    downgrade(url, "base")
    assert _tables(url) <= {"alembic_version"}

    migrate(url)
    assert _schema_diff(url) == []
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            assert connection.execute(text("SELECT id FROM projects")).scalars().all() == ["default"]
    finally:
        engine.dispose()
