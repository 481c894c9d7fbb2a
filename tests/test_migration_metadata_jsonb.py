"""Job metadata on PostgreSQL is jsonb: the database itself refuses a NUL, and a row that stored
one under the old json column is repaired by the migration (before it, every metadata filter of
its project failed)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError

from tests.support import create_database, drop_database
from tuneforge.db import downgrade, migrate

_INSERT_JOB = """
INSERT INTO jobs (id, project_id, model, status, spec, training_file, seed, metadata, queue,
                  created_at, updated_at, attempt, max_attempts, last_event_seq)
VALUES (:id, 'default', 'm', 'cancelled', '{}', 'file-x', 0, CAST(:metadata AS json), 'gpu',
        now(), now(), 0, 3, 0)
"""
_FILTER = "SELECT id FROM jobs WHERE metadata ->> 'k' = :value ORDER BY id"


@pytest.fixture
def pg_url() -> Iterator[str]:
    name, url = create_database("tf_jsonb")
    try:
        yield url
    finally:
        drop_database(name)


def test_stored_nul_is_repaired_and_refused_from_then_on(pg_url: str) -> None:
    migrate(pg_url, "0001")
    engine = create_engine(pg_url)
    try:
        with engine.begin() as connection:
            connection.execute(text(_INSERT_JOB), {"id": "ftjob-poisoned", "metadata": '{"k": "a\\u0000b"}'})
            connection.execute(text(_INSERT_JOB), {"id": "ftjob-literal", "metadata": '{"k": "\\\\u0000"}'})
        with pytest.raises(DBAPIError, match=r"unsupported Unicode escape"), engine.connect() as connection:
            connection.execute(text(_FILTER), {"value": "ab"}).all()

        migrate(pg_url)
        with engine.connect() as connection:
            assert connection.execute(text(_FILTER), {"value": "ab"}).scalars().all() == ["ftjob-poisoned"]
            assert connection.execute(text(_FILTER), {"value": "\\u0000"}).scalars().all() == [
                "ftjob-literal"
            ]
        with pytest.raises(DBAPIError, match=r"unsupported Unicode escape"), engine.begin() as connection:
            metadata = {"id": "ftjob-new", "metadata": '{"k": "\\u0000"}'}
            connection.execute(text(_INSERT_JOB.replace("AS json", "AS jsonb")), metadata)

        downgrade(pg_url, "0001")
        with engine.connect() as connection:
            assert connection.execute(text(_FILTER), {"value": "ab"}).scalars().all() == ["ftjob-poisoned"]
    finally:
        engine.dispose()
