"""SIGTERM to a worker with a running job: the job checkpoints, is handed back to its queue (not a
spent attempt) and the worker exits within its shutdown grace; another worker resumes the job
from that checkpoint. Real worker processes, a private redis-server, the stand-in training
callable."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import wait_for
from tuneforge.db import session_scope
from tuneforge.models.job import cancel_job, get_job_any_project
from tuneforge.worker.celery_app import RUN_JOB_TASK, make_celery

from .helpers import checkpoints, events, get_job, metric_steps, seed_job, status
from .procs import Services, running_services, training_processes

pytestmark = pytest.mark.slow

GRACE_SECONDS = 10
TOTAL_STEPS = 120  # 30 s at the first worker's pace: far longer than the grace


@pytest.fixture(scope="module")
def shutdown_services(
    pg_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory, models_dir: Path
) -> Iterator[Services]:
    env = {
        "TUNEFORGE_LEASE_SECONDS": "10",
        "TUNEFORGE_QUEUED_STALE_SECONDS": "300",  # no reconciler help: the hand-back re-sends the job
        "TUNEFORGE_WORKER_SHUTDOWN_GRACE_SECONDS": str(GRACE_SECONDS),
    }
    with running_services(tmp_path_factory.mktemp("sigterm"), pg_url, redis_url, models_dir, env) as services:
        yield services


def _descendants(process: subprocess.Popen[bytes]) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def test_sigterm_hands_the_running_job_back_with_a_checkpoint(
    shutdown_services: Services, qa_path: Path
) -> None:
    services = shutdown_services
    first = services.worker(extra_env={"STANDIN_STEP_SECONDS": "0.25"})
    job_id = seed_job(
        services, qa_path, max_steps=TOTAL_STEPS, save_every=1000
    )  # no checkpoint but the stop's
    make_celery(services.settings()).send_task(RUN_JOB_TASK, args=[job_id], queue="gpu")
    wait_for(lambda: len(metric_steps(services, job_id)) >= 4, 120, "training to start", services)
    family = _descendants(first)

    asked = time.monotonic()
    os.kill(first.pid, signal.SIGTERM)  # the main process only, as an orchestrator does
    try:
        first.wait(timeout=GRACE_SECONDS + 40)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the worker did not exit after SIGTERM\n{services.logs()}")
    took = time.monotonic() - asked
    assert took < GRACE_SECONDS + 20, (took, services.logs())
    assert not [pid for pid in family if pid in {p.pid for p in training_processes()}]

    job = get_job(services, job_id)
    assert job.status == "queued", (job.status, job.error, services.logs())
    assert job.attempt == 0  # a hand-back is not a spent attempt
    assert job.lease_owner is None and job.lease_expires_at is None
    stops = checkpoints(services, job_id)
    assert len(stops) == 1, stops
    stopped_at = stops[0].step_number
    assert 4 <= stopped_at < TOTAL_STEPS
    assert job.progress and job.progress["step"] == stopped_at
    texts = [e.message for e in events(services, job_id)]
    assert any("handed back" in t and f"step {stopped_at}" in t for t in texts), texts

    # The hand-back sent the job to its queue again: the next worker takes it without any help.
    second = services.worker(extra_env={"STANDIN_STEP_SECONDS": "0.02"})
    try:
        assert wait_for(lambda: status(services, job_id) == "succeeded", 120, "the resumed run", services)
    finally:
        services.stop(second)
    job = get_job(services, job_id)
    assert job.attempt == 1
    texts = [e.message for e in events(services, job_id)]
    assert f"Fine-tuning job started (attempt 1) from checkpoint at step {stopped_at}." in texts, texts
    steps = metric_steps(services, job_id)
    assert steps == list(range(1, TOTAL_STEPS + 1)), steps


def test_ctrl_c_to_the_whole_worker_hands_the_job_back_too(
    shutdown_services: Services, qa_path: Path
) -> None:
    """Ctrl-C in a terminal interrupts every process of the worker, the training process too: the
    job is handed back from its last checkpoint instead of failing with KeyboardInterrupt."""
    services = shutdown_services
    worker = services.worker(extra_env={"STANDIN_STEP_SECONDS": "0.25"})
    job_id = seed_job(services, qa_path, max_steps=TOTAL_STEPS, save_every=3)
    make_celery(services.settings()).send_task(RUN_JOB_TASK, args=[job_id], queue="gpu")
    wait_for(lambda: checkpoints(services, job_id), 120, "a checkpoint", services)

    asked = time.monotonic()
    os.killpg(worker.pid, signal.SIGINT)  # the worker leads its own process group
    try:
        worker.wait(timeout=GRACE_SECONDS + 40)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the worker did not exit after Ctrl-C\n{services.logs()}")
    assert time.monotonic() - asked < GRACE_SECONDS + 20, services.logs()
    job = get_job(services, job_id)
    assert job.status == "queued", (job.status, job.error, services.logs())
    assert job.attempt == 0 and job.error is None
    assert any("handed back" in e.message for e in events(services, job_id))
    _cancel(services, job_id)  # its message waits in the queue: not for the next test's worker


def _cancel(services: Services, job_id: str) -> None:
    with session_scope(services.sessions) as session:
        job = get_job_any_project(session, job_id)
        assert job is not None
        cancel_job(session, job)


def test_a_checkpoint_too_slow_for_the_grace_hands_the_job_back_without_it(
    shutdown_services: Services, qa_path: Path
) -> None:
    """The grace ends before the stop's checkpoint is made: the training process is stopped and the
    job goes back to its queue from its previous checkpoint, within the grace. Its training
    process is a fresh interpreter (no fork server), the other test's a fork: both are stopped."""
    services = shutdown_services
    grace = 4
    worker = services.worker(
        extra_env={
            "TUNEFORGE_WORKER_FORK_SERVER": "false",
            "STANDIN_STEP_SECONDS": "0.25",
            "STANDIN_STOP_CHECKPOINT_SECONDS": "120",
            "TUNEFORGE_WORKER_SHUTDOWN_GRACE_SECONDS": str(grace),
        }
    )
    job_id = seed_job(services, qa_path, max_steps=TOTAL_STEPS, save_every=3)
    make_celery(services.settings()).send_task(RUN_JOB_TASK, args=[job_id], queue="gpu")
    wait_for(lambda: checkpoints(services, job_id), 120, "a checkpoint", services)

    asked = time.monotonic()
    os.kill(worker.pid, signal.SIGTERM)
    try:
        worker.wait(timeout=grace + 40)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the worker did not exit after SIGTERM\n{services.logs()}")
    assert time.monotonic() - asked < grace + 20, services.logs()
    job = get_job(services, job_id)
    assert job.status == "queued", (job.status, job.error, services.logs())
    assert job.attempt == 0 and job.error is None
    assert all(c.step_number % 3 == 0 for c in checkpoints(services, job_id))  # none from the stop
    texts = [e.message for e in events(services, job_id)]
    assert any("no checkpoint could be made" in t and "handed back" in t for t in texts), texts
