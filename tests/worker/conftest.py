"""Real services for the job-execution tests: a throwaway PostgreSQL database built by the
migrations and a private redis-server (`pg_url`, `redis_url`, from tests/conftest.py), Celery
worker and beat processes started with `tuneforge worker` / `tuneforge beat`, and the object
store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tuneforge.db import session_scope

from .procs import Services, running_services


@pytest.fixture(scope="module")
def services(
    pg_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory, models_dir: Path
) -> Iterator[Services]:
    env = {
        "TUNEFORGE_LEASE_SECONDS": "4",
        "TUNEFORGE_RECONCILE_EVERY_SECONDS": "1",
        "TUNEFORGE_QUEUED_STALE_SECONDS": "3",
        "TUNEFORGE_KEEP_CHECKPOINTS": "2",
    }
    with running_services(tmp_path_factory.mktemp("worker"), pg_url, redis_url, models_dir, env) as svc:
        yield svc


def session(services: Services) -> Any:
    return session_scope(services.sessions)
