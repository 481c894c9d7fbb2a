"""Redis restarted empty while jobs wait: the reconciler (beat) sends them again and all succeed.
A private redis-server without persistence on a free port, so a restart really loses the queue."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tuneforge.db import make_engine, make_sessionmaker
from tuneforge.worker.celery_app import RUN_JOB_TASK, make_celery

from .helpers import events, seed_job, status
from .procs import REPO, STANDIN, Services, free_port, wait_for

pytestmark = pytest.mark.slow


def _start_redis(port: int, tmp: Path) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    wait_for(lambda: _ping(client), 10, "redis-server to answer")
    return process


def _ping(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@pytest.fixture(scope="module")
def private(
    pg_url: str, tmp_path_factory: pytest.TempPathFactory, models_dir: Path
) -> Iterator[tuple[Services, int]]:
    tmp = tmp_path_factory.mktemp("redis-restart")
    port = free_port()
    env = {
        "TUNEFORGE_DATA_DIR": str(tmp / "data"),
        "TUNEFORGE_DATABASE_URL": pg_url,
        "TUNEFORGE_BROKER_URL": f"redis://127.0.0.1:{port}/0",
        "TUNEFORGE_STORAGE_URL": f"file://{tmp / 'objects'}",
        "TUNEFORGE_MODELS_DIR": str(models_dir),
        "TUNEFORGE_LEASE_SECONDS": "5",
        "TUNEFORGE_RECONCILE_EVERY_SECONDS": "1",
        "TUNEFORGE_QUEUED_STALE_SECONDS": "3",
        "TUNEFORGE_TRAINING_RUNNER": STANDIN,
        "STANDIN_STEP_SECONDS": "0.2",
        "PYTHONPATH": str(REPO),
    }
    engine = make_engine(pg_url, pool_size=2, max_overflow=2)
    svc = Services(env, tmp, engine, make_sessionmaker(engine))
    yield svc, port
    svc.stop_all()
    engine.dispose()


def test_redis_restarted_empty_with_three_waiting_jobs(private: tuple[Services, int], qa_path: Path) -> None:
    services, port = private
    server = _start_redis(port, services.tmp)
    try:
        app = make_celery(services.settings())
        running = seed_job(services, qa_path, max_steps=15, save_every=5)
        waiting = [seed_job(services, qa_path, max_steps=3, save_every=3) for _ in range(3)]
        services.worker()
        services.beat()
        for job_id in [running, *waiting]:
            app.send_task(RUN_JOB_TASK, args=[job_id], queue="gpu")
        wait_for(lambda: status(services, running) == "running", 60, "the first job to run", services)
        assert redis.Redis(port=port).llen("gpu") == 3  # the three others wait in Redis

        server.terminate()
        server.wait(timeout=10)
        server = _start_redis(port, services.tmp)  # empty: no persistence
        assert redis.Redis(port=port).llen("gpu") == 0

        for job_id in [running, *waiting]:
            wait_for(
                lambda j=job_id: status(services, j) == "succeeded", 120, f"{job_id} to succeed", services
            )
        for job_id in waiting:
            started = [e for e in events(services, job_id) if e.message.startswith("Fine-tuning job started")]
            assert len(started) == 1, [e.message for e in events(services, job_id)]
    finally:
        services.stop_all()
        server.terminate()
        server.wait(timeout=10)
        time.sleep(0.1)
