"""Real services for the job-execution tests: a throwaway PostgreSQL database built by the
migrations, Redis (a db number of its own, or a private redis-server), Celery worker and beat
processes started with `tuneforge worker` / `tuneforge beat`, and the object store."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from tuneforge.db import make_engine, make_sessionmaker, session_scope

from .procs import REPO, STANDIN, Services, migrate

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for the module, migrated to head, dropped afterwards."""
    name = f"tf_worker_{uuid.uuid4().hex[:10]}"
    admin = make_engine(PG_ADMIN_URL, pool_size=1, max_overflow=0).execution_options(
        isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    migrate(url)
    yield url
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """A Redis db number of its own on the shared server, emptied before and after."""
    import redis

    db = 8 + uuid.uuid4().int % 8
    url = f"redis://127.0.0.1:6379/{db}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()


@pytest.fixture(scope="module")
def services(
    pg_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory, models_dir: Path
) -> Iterator[Services]:
    tmp = tmp_path_factory.mktemp("worker")
    env = {
        "TUNEFORGE_DATA_DIR": str(tmp / "data"),
        "TUNEFORGE_DATABASE_URL": pg_url,
        "TUNEFORGE_BROKER_URL": redis_url,
        "TUNEFORGE_STORAGE_URL": f"file://{tmp / 'objects'}",
        "TUNEFORGE_MODELS_DIR": str(models_dir),
        "TUNEFORGE_LEASE_SECONDS": "4",
        "TUNEFORGE_RECONCILE_EVERY_SECONDS": "1",
        "TUNEFORGE_QUEUED_STALE_SECONDS": "3",
        "TUNEFORGE_KEEP_CHECKPOINTS": "2",
        "TUNEFORGE_TRAINING_RUNNER": STANDIN,
        "PYTHONPATH": str(REPO),
    }
    engine = make_engine(pg_url, pool_size=2, max_overflow=2)
    svc = Services(env, tmp, engine, make_sessionmaker(engine))
    yield svc
    svc.stop_all()
    engine.dispose()


def session(services: Services) -> Any:
    return session_scope(services.sessions)
