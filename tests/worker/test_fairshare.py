"""Fair share between projects: the pick on both backends, two workers picking at once on
PostgreSQL, and a real worker process that runs one project's late single job second, not after
the other project's whole backlog, every job exactly once."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from tests.support import pg_database, wait_for
from tuneforge.db import make_engine, make_sessionmaker, migrate, session_scope, utcnow
from tuneforge.models.job import Job, JobStatus, new_job_id
from tuneforge.models.project import create_project
from tuneforge.worker import fairshare
from tuneforge.worker.celery_app import RUN_JOB_TASK, make_celery
from tuneforge.worker.jobstate import claim_job

from .helpers import events, get_job, seed_job
from .procs import Services


@pytest.fixture(params=["sqlite", "postgresql"])
def sessions(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'fair.db'}"
        migrate(url)
        engine = make_engine(url)
        yield make_sessionmaker(engine)
        engine.dispose()
        return
    with pg_database("tf_fair") as url:
        engine = make_engine(url, pool_size=4, max_overflow=2)
        yield make_sessionmaker(engine)
        engine.dispose()


def _add_jobs(sessions: sessionmaker[Session], project: str, count: int, start_minute: int) -> list[str]:
    """Queued jobs (rows only: the pick reads nothing else), one a minute from `start_minute`."""
    base = utcnow() - timedelta(hours=1)
    ids = []
    with session_scope(sessions) as session:
        for i in range(count):
            at = base + timedelta(minutes=start_minute + i)
            job = Job(
                id=new_job_id(),
                project_id=project,
                model="tuneforge/tiny-chat",
                status=JobStatus.QUEUED.value,
                spec={},
                training_file="file-x",
                seed=1,
                queue="gpu",
                created_at=at,
                updated_at=at,
                attempt=0,
                max_attempts=3,
                last_event_seq=0,
            )
            session.add(job)
            ids.append(job.id)
    return ids


def _projects(sessions: sessionmaker[Session], *names: str) -> list[str]:
    with session_scope(sessions) as session:
        return [create_project(session, name).id for name in names]


def _claim(sessions: sessionmaker[Session], owner: str) -> str | None:
    job = fairshare.claim_fairest(sessions, "gpu", lambda s, picked: claim_job(s, picked, owner, 60))
    return None if job is None else job.id


def _finish(sessions: sessionmaker[Session], job_id: str) -> None:
    with session_scope(sessions) as session:
        session.execute(
            update(Job).where(Job.id == job_id).values(status=JobStatus.SUCCEEDED.value, lease_owner=None)
        )


def test_projects_take_turns_and_fewest_running_goes_first(sessions: sessionmaker[Session]) -> None:
    a, b, c = _projects(sessions, "a", "b", "c")
    a_jobs = _add_jobs(sessions, a, 5, 0)
    b_jobs = _add_jobs(sessions, b, 1, 10)  # created after all of A's
    c_jobs = _add_jobs(sessions, c, 2, 20)

    # Nothing runs: every project ties on 0 running and none ever started; the oldest job goes.
    assert _claim(sessions, "w1") == a_jobs[0]
    # A has one running: B and C have none; B's job is older than C's.
    assert _claim(sessions, "w2") == b_jobs[0]
    assert _claim(sessions, "w3") == c_jobs[0]
    # One running each: A last started longest ago.
    assert _claim(sessions, "w4") == a_jobs[1]
    # One worker, one job at a time: with nothing running the projects take turns.
    for job_id in (a_jobs[0], b_jobs[0], c_jobs[0], a_jobs[1]):
        _finish(sessions, job_id)
    assert _claim(sessions, "w5") == c_jobs[1]  # C started least recently of those that wait
    _finish(sessions, c_jobs[1])
    assert [_claim(sessions, "w6"), _claim(sessions, "w7"), _claim(sessions, "w8")] == a_jobs[2:]
    assert _claim(sessions, "w9") is None  # a message with nothing left to claim ends at once


def test_other_queues_and_unrunnable_jobs_are_not_picked(sessions: sessionmaker[Session]) -> None:
    (a,) = _projects(sessions, "a")
    waiting, paused, elsewhere = _add_jobs(sessions, a, 3, 0)
    with session_scope(sessions) as session:
        session.execute(update(Job).where(Job.id == paused).values(status=JobStatus.PAUSED.value))
        session.execute(update(Job).where(Job.id == elsewhere).values(queue="small"))
    assert _claim(sessions, "w1") == waiting
    assert _claim(sessions, "w2") is None


def test_two_workers_picking_at_once_take_different_jobs(sessions: sessionmaker[Session]) -> None:
    """On PostgreSQL the first pick's row lock makes the second skip that job; on SQLite the
    writes are serialised and the loser picks again."""
    (a,) = _projects(sessions, "a")
    jobs = _add_jobs(sessions, a, 2, 0)
    with session_scope(sessions) as first:
        picked = fairshare.pick_job(first, "gpu")
        assert picked == jobs[0]
        assert claim_job(first, picked, "w1", 60) is not None
        if first.get_bind().dialect.name == "postgresql":  # still uncommitted: the lock is held
            assert _claim(sessions, "w2") == jobs[1]
    if first.get_bind().dialect.name != "postgresql":
        assert _claim(sessions, "w2") == jobs[1]


# --- a real worker --------------------------------------------------------------------------------


@pytest.mark.slow
def test_one_worker_runs_a_late_single_job_second(services: Services, qa_path: Path) -> None:
    """Project A queues five jobs, then project B one; one worker process, one job at a time,
    one message per job in creation order. B's job runs second, and every job runs once."""
    a_jobs = [seed_job(services, qa_path, max_steps=2, save_every=2) for _ in range(5)]
    b_job = seed_job(services, qa_path, max_steps=2, save_every=2)
    base = utcnow() - timedelta(minutes=10)
    with session_scope(services.sessions) as session:
        b_project = create_project(session, "b").id
        session.execute(update(Job).where(Job.id == b_job).values(project_id=b_project))
        for i, job_id in enumerate([*a_jobs, b_job]):
            session.execute(
                update(Job).where(Job.id == job_id).values(created_at=base + timedelta(seconds=i))
            )
    celery = make_celery(services.settings())
    for job_id in [*a_jobs, b_job]:
        celery.send_task(RUN_JOB_TASK, args=[job_id], queue="gpu")
    services.worker(queues="gpu", concurrency=1)

    everything = [*a_jobs, b_job]
    wait_for(
        lambda: all(get_job(services, j).status == JobStatus.SUCCEEDED.value for j in everything),
        timeout=600,
        what="all six jobs succeeded",
        logs=services,
    )
    order = sorted(everything, key=lambda j: get_job(services, j).started_at)  # type: ignore[arg-type,return-value]
    assert order[1] == b_job, order
    for job_id in everything:
        starts = [e for e in events(services, job_id) if e.message.startswith("Fine-tuning job started")]
        assert len(starts) == 1, (job_id, [e.message for e in starts])
        assert get_job(services, job_id).attempt == 1
