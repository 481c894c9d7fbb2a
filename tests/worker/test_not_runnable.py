"""A worker checks a job is still runnable before it spends anything on it: messages for jobs
that were cancelled (while validating or queued), paused or finished are dropped by the worker's
consumer, so they start no pool process, no training process and download nothing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tuneforge.db import session_scope, utcnow
from tuneforge.models.job import Job, JobStatus, cancel_job, pause_job
from tuneforge.worker.jobstate import why_not_runnable

from .helpers import seed_job, sender, status
from .procs import Services, wait_for

pytestmark = pytest.mark.slow


def _worker_log(services: Services) -> str:
    return "".join(path.read_text(errors="replace") for path in sorted(services.tmp.glob("worker-*.log")))


def test_messages_of_jobs_that_are_not_runnable_spawn_nothing(services: Services, qa_path: Path) -> None:
    dead: list[str] = []
    for initial in [JobStatus.VALIDATING_FILES] * 8 + [JobStatus.QUEUED] * 8:
        job_id = seed_job(services, qa_path, status=initial)
        with session_scope(services.sessions) as session:
            job = session.get(Job, job_id)
            assert job is not None
            cancel_job(session, job)
        dead.append(job_id)
    for _ in range(3):
        job_id = seed_job(services, qa_path)
        with session_scope(services.sessions) as session:
            job = session.get(Job, job_id)
            assert job is not None
            pause_job(session, job)
        dead.append(job_id)
    finished = seed_job(services, qa_path)
    with session_scope(services.sessions) as session:
        job = session.get(Job, finished)
        assert job is not None
        job.status = JobStatus.SUCCEEDED.value
    dead.append(finished)

    send = sender(services)
    for job_id in dead:
        send(job_id)
        send(job_id)  # duplicates too
    worker = services.worker()
    try:

        def dropped() -> list[str]:
            pattern = r"job (ftjob-\S+): .*; message dropped before it reached a pool process"
            return re.findall(pattern, _worker_log(services))

        wait_for(lambda: len(dropped()) >= 2 * len(dead), 240, "the dead messages to be dropped", services)
        # A run message is a claim token for its queue: with a job waiting there, it is not dead.
        live = seed_job(services, qa_path, max_steps=2, save_every=2)
        send(live)
        done = wait_for(
            lambda: status(services, live) in ("succeeded", "failed"), 240, "the live job", services
        )
        assert done
    finally:
        services.stop(worker)
    assert status(services, live) == "succeeded", services.logs()

    log = _worker_log(services)
    assert sorted(dropped()) == sorted(dead * 2)
    # Pool processes that warmed up a spare training process: the first one (which ran the live
    # job) and at most its replacement; none for the dropped messages.
    assert log.count("spare training process") <= 2, log.count("spare training process")
    for job_id in dead:
        assert f"job {job_id}: not-claimed" not in log
        assert status(services, job_id) in ("cancelled", "paused", "succeeded")

    # A dead job's message becomes a live token again once another job of its queue waits.
    waiting = seed_job(services, qa_path)
    with session_scope(services.sessions) as session:
        assert why_not_runnable(session, dead[0], utcnow()) is None
        job = session.get(Job, waiting)
        assert job is not None
        cancel_job(session, job)
    with session_scope(services.sessions) as session:
        reason = why_not_runnable(session, dead[0], utcnow())
        assert reason == "it is cancelled and no other job of its queue waits"
