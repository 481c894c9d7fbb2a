"""A running job survives its database going away: a PostgreSQL restart, and pg_terminate_backend
of every connection it has. Training goes on, events and checkpoint rows are held and written
once the database answers, and the job succeeds on its first attempt. A cluster of the module's
own (initdb/pg_ctl on a free port), a private redis-server, real worker and beat processes and
the stand-in training callable.

An outage longer than the lease is the one that costs an attempt: the worker gives its run up
and the job resumes elsewhere from its checkpoint.

The first tests are quick checks of the retry rules themselves, without processes."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import exc as sa_exc

from tests.support import PgCluster, wait_for
from tuneforge.worker.celery_app import RUN_JOB_TASK, make_celery
from tuneforge.worker.resilience import (
    Backoff,
    LeaseClock,
    Outage,
    OutageOutlastedLease,
    describe_error,
    is_transient,
    retry_transient,
)

from .helpers import checkpoints, events, get_job, metric_steps, seed_job
from .procs import Services, running_services

TOTAL_STEPS = 16


def _dropped() -> sa_exc.OperationalError:
    return sa_exc.OperationalError(
        "UPDATE jobs SET lease_expires_at=%(x)s WHERE jobs.id = %(id)s",
        {"id": "ftjob-1"},
        psycopg.OperationalError("terminating connection due to administrator command"),
    )


# --- the rules --------------------------------------------------------------------------------


def test_transient_errors_are_told_from_faults() -> None:
    assert is_transient(_dropped())
    assert is_transient(psycopg.OperationalError("connection refused"))
    assert is_transient(ConnectionRefusedError())
    assert not is_transient(sa_exc.IntegrityError("INSERT", {}, psycopg.IntegrityError("duplicate key")))
    assert not is_transient(ValueError("bad"))


def test_an_error_description_carries_no_sql() -> None:
    text = describe_error(_dropped())
    assert text == "OperationalError: terminating connection due to administrator command"
    assert "UPDATE" not in text and "ftjob-1" not in text


def test_retry_until_the_action_succeeds() -> None:
    calls: list[int] = []
    slept: list[float] = []

    def action() -> str:
        calls.append(1)
        if len(calls) < 4:
            raise _dropped()
        return "written"

    result = retry_transient(action, until=time.monotonic() + 60, what="the final write", sleep=slept.append)
    assert result == "written" and len(calls) == 4 and len(slept) == 3


def test_retry_stops_at_the_deadline_and_lets_faults_through() -> None:
    def down() -> None:
        raise _dropped()

    with pytest.raises(OutageOutlastedLease):
        retry_transient(down, until=time.monotonic() + 0.3, what="w", backoff=Backoff(first=0.05, cap=0.1))

    def broken() -> None:
        raise ValueError("a bug, not an outage")

    with pytest.raises(ValueError):
        retry_transient(broken, until=time.monotonic() + 60, what="w", sleep=lambda _: None)


def test_an_outage_ends_the_run_only_once_it_outlasts_the_lease() -> None:
    lease = LeaseClock(10.0, renewed_at=100.0)
    outage = Outage("ftjob-1", lease, Backoff(first=1.0, cap=2.0))
    outage.failed(_dropped(), now=101.0)
    assert outage.active and not outage.due(now=101.1)
    outage.failed(_dropped(), now=105.0)
    lease.renewed(106.0)  # the database answered again: a write renewed the lease
    outage.recovered(held=12, now=106.0)
    assert not outage.active and outage.due(now=106.0)
    outage.failed(_dropped(), now=112.0)
    with pytest.raises(OutageOutlastedLease):
        outage.failed(_dropped(), now=116.5)  # 10.5 s after the last renewal


# --- real processes -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[PgCluster]:
    with PgCluster() as server:  # in a temporary directory of its own, removed afterwards
        yield server


@pytest.fixture(scope="module")
def outage(
    cluster: PgCluster, redis_url: str, tmp_path_factory: pytest.TempPathFactory, models_dir: Path
) -> Iterator[tuple[Services, str]]:
    url = cluster.create_database("tf_outage")
    env = {
        "TUNEFORGE_LEASE_SECONDS": "40",  # longer than any outage below, with room for a slow start
        "TUNEFORGE_RECONCILE_EVERY_SECONDS": "1",
        "TUNEFORGE_QUEUED_STALE_SECONDS": "60",
        "TUNEFORGE_KEEP_CHECKPOINTS": "2",
        "STANDIN_STEP_SECONDS": "0.25",
    }
    with running_services(tmp_path_factory.mktemp("outage"), url, redis_url, models_dir, env) as services:
        services.worker()
        services.beat()  # the reconciler would requeue the job (a second attempt) if its lease ran out
        yield services, url


def _send(services: Services, job_id: str) -> None:
    make_celery(services.settings()).send_task(RUN_JOB_TASK, args=[job_id], queue="gpu")


def _read(services: Services, read: Callable[[], Any]) -> Any:
    """`read()`, or None while the test's own connections are down too."""
    try:
        return read()
    except (sa_exc.OperationalError, sa_exc.InterfaceError, psycopg.OperationalError):
        return None


def _step(services: Services, job_id: str) -> int:
    job = _read(services, lambda: get_job(services, job_id))
    return int(((job.progress if job else None) or {}).get("step") or 0)


def _finished(services: Services, job_id: str) -> str | None:
    job = _read(services, lambda: get_job(services, job_id))
    return job.status if job is not None and job.status in ("succeeded", "failed", "cancelled") else None


def _assert_finished_on_first_attempt(services: Services, job_id: str) -> None:
    assert wait_for(lambda: _finished(services, job_id), 150, "the job to finish", services) == "succeeded", (
        get_job(services, job_id).error,
        services.logs(),
    )
    job = get_job(services, job_id)
    assert job.attempt == 1 and job.error is None
    assert job.progress and job.progress["step"] == TOTAL_STEPS
    assert sorted(set(metric_steps(services, job_id))) == list(range(1, TOTAL_STEPS + 1))
    started = [e.message for e in events(services, job_id) if e.message.startswith("Fine-tuning job started")]
    assert started == ["Fine-tuning job started (attempt 1)."]
    assert [c.step_number for c in checkpoints(services, job_id)] == [TOTAL_STEPS - 4, TOTAL_STEPS]


@pytest.mark.slow
def test_a_job_finishes_through_a_postgresql_restart(
    outage: tuple[Services, str], cluster: PgCluster, qa_path: Path
) -> None:
    """The database goes down a few steps in and stays down past the end of training: the
    checkpoints at steps 8, 12 and 16 and the final result wait in memory for it."""
    services, _ = outage
    job_id = seed_job(services, qa_path, max_steps=TOTAL_STEPS, save_every=4)
    _send(services, job_id)
    wait_for(lambda: _step(services, job_id) >= 3, 120, "training to start", services)
    assert _step(services, job_id) < TOTAL_STEPS - 4  # the fault lands mid-run
    cluster.stop()
    time.sleep(max(6.0, TOTAL_STEPS * 0.25))  # training ends while the database is down
    cluster.start()
    _assert_finished_on_first_attempt(services, job_id)
    texts = [e.message for e in events(services, job_id)]
    assert "Checkpoint saved at step 12." in texts and "The job has successfully completed." in texts
    assert "database unreachable" in services.logs()


@pytest.mark.slow
def test_a_job_finishes_through_its_connections_being_terminated(
    outage: tuple[Services, str], cluster: PgCluster, qa_path: Path
) -> None:
    """pg_terminate_backend of every connection while the worker's lease renewal is in flight
    (held back by a row lock the test takes, so the kill lands mid-statement), then of the idle
    ones again a little later."""
    services, url = outage
    job_id = seed_job(services, qa_path, max_steps=TOTAL_STEPS, save_every=4)
    _send(services, job_id)
    wait_for(lambda: _step(services, job_id) >= 3, 120, "training to start", services)
    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    dbname = url.rsplit("/", 1)[1]
    with psycopg.connect(dsn) as locker:
        locker.execute("SELECT id FROM jobs WHERE id = %s FOR UPDATE", (job_id,))
        with psycopg.connect(dsn, autocommit=True) as admin:

            def waiting() -> int:
                row = admin.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'",
                    (dbname,),
                ).fetchone()
                return int(row[0]) if row else 0

            wait_for(waiting, 30, "the worker's write to wait on the row lock", services)
            killed = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid NOT IN (pg_backend_pid(), %s)",
                (dbname, locker.info.backend_pid),
            ).fetchall()
            assert any(ok for (ok,) in killed)
        locker.rollback()
    time.sleep(1.5)
    cluster.terminate_backends(url)
    _assert_finished_on_first_attempt(services, job_id)


SHORT_LEASE_SECONDS = 6


@pytest.fixture(scope="module")
def short_lease(
    cluster: PgCluster, redis_url: str, tmp_path_factory: pytest.TempPathFactory, models_dir: Path
) -> Iterator[tuple[Services, str]]:
    """A second database and broker db on the same servers, whose workers hold a short lease."""
    url = cluster.create_database("tf_outage_short")
    broker = redis_url.rsplit("/", 1)[0] + "/1"
    env = {
        "TUNEFORGE_LEASE_SECONDS": str(SHORT_LEASE_SECONDS),
        "TUNEFORGE_RECONCILE_EVERY_SECONDS": "1",
        "TUNEFORGE_QUEUED_STALE_SECONDS": "60",
        "STANDIN_STEP_SECONDS": "0.25",
    }
    with running_services(tmp_path_factory.mktemp("short-lease"), url, broker, models_dir, env) as services:
        services.worker()
        services.beat()
        yield services, url


@pytest.mark.slow
def test_an_outage_longer_than_the_lease_gives_the_run_up(
    short_lease: tuple[Services, str], cluster: PgCluster, qa_path: Path
) -> None:
    """Past its lease a worker must assume the job runs elsewhere: it stops training, and once the
    database is back the reconciler queues the job again; it resumes from its checkpoint on a
    second attempt and succeeds."""
    services, _ = short_lease
    total = 60
    job_id = seed_job(services, qa_path, max_steps=total, save_every=4)
    _send(services, job_id)
    wait_for(lambda: _read(services, lambda: checkpoints(services, job_id)), 120, "a checkpoint", services)
    cluster.stop()
    wait_for(
        lambda: "may run elsewhere now" in services.logs(),
        SHORT_LEASE_SECONDS + 60,
        "the worker to give the run up",
        services,
    )
    cluster.start()
    assert wait_for(lambda: _finished(services, job_id), 150, "the job to finish", services) == "succeeded"
    job = get_job(services, job_id)
    assert job.attempt == 2 and job.error is None
    assert sorted(set(metric_steps(services, job_id))) == list(range(1, total + 1))
    assert any("was lost" in e.message for e in events(services, job_id))
