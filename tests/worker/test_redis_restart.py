"""Redis restarted empty while jobs wait: the reconciler (beat) sends them again and all succeed.
A private redis-server without persistence on a free port, so a restart really loses the queue."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import RedisServer, wait_for
from tuneforge.worker.celery_app import RUN_JOB_TASK, make_celery

from .helpers import events, get_job, seed_job, status
from .procs import Services, running_services

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def private(
    pg_url: str, tmp_path_factory: pytest.TempPathFactory, models_dir: Path
) -> Iterator[tuple[Services, RedisServer]]:
    tmp = tmp_path_factory.mktemp("redis-restart")
    redis_server = RedisServer(directory=tmp)
    env = {
        "TUNEFORGE_LEASE_SECONDS": "5",
        "TUNEFORGE_RECONCILE_EVERY_SECONDS": "1",
        "TUNEFORGE_QUEUED_STALE_SECONDS": "3",
        "STANDIN_STEP_SECONDS": "0.2",
    }
    try:
        with running_services(tmp, pg_url, redis_server.url(0), models_dir, env) as svc:
            yield svc, redis_server
    finally:
        redis_server.stop()


def _started(services: Services, job_id: str) -> list[str]:
    return [e.message for e in events(services, job_id) if e.message.startswith("Fine-tuning job started")]


def test_redis_restarted_empty_with_three_waiting_jobs(
    private: tuple[Services, RedisServer], qa_path: Path
) -> None:
    """What the system promises, whatever the timing (the reconciler may send a waiting job's
    message again at any moment): every job succeeds, and each runs exactly once -- one claim
    (attempt 1) and one start event, never a second training run."""
    services, redis_server = private
    redis_server.start()
    app = make_celery(services.settings())
    # The first job runs long enough (40 steps x 0.2 s) that, with one worker slot, the others are
    # still waiting when Redis goes away.
    running = seed_job(services, qa_path, max_steps=40, save_every=10)
    waiting = [seed_job(services, qa_path, max_steps=3, save_every=3) for _ in range(3)]
    services.worker()
    services.beat()
    for job_id in [running, *waiting]:
        app.send_task(RUN_JOB_TASK, args=[job_id], queue="gpu")
    wait_for(lambda: status(services, running) == "running", 120, "the first job to run", services)
    not_started = [j for j in waiting if not _started(services, j)]
    assert not_started, "every waiting job started before the restart: nothing was tested"

    redis_server.restart()
    # It came back empty: nothing persisted (counting keys would race with the worker and beat,
    # which reconnect and write their own at once).
    restarted = redis_server.client()
    assert restarted.config_get("save") == {"save": ""}
    assert restarted.config_get("appendonly") == {"appendonly": "no"}
    assert not (redis_server.directory / "dump.rdb").exists()

    for job_id in [running, *waiting]:
        wait_for(lambda j=job_id: status(services, j) == "succeeded", 180, f"{job_id} to succeed", services)
    for job_id in [running, *waiting]:
        job = get_job(services, job_id)
        assert job.attempt == 1, (job_id, job.attempt, services.logs())
        assert len(_started(services, job_id)) == 1, [e.message for e in events(services, job_id)]
