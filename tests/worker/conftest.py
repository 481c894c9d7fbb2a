"""Real services for the job-execution tests: a throwaway PostgreSQL database built by the
migrations and a private redis-server (`pg_url`, `redis_url`, from tests/conftest.py), Celery
worker and beat processes started with `tuneforge worker` / `tuneforge beat`, and the object
store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tuneforge.db import make_engine, make_sessionmaker, session_scope

from .procs import REPO, STANDIN, Services


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
