"""The worker's queries on jobs: claim with a lease, renew it, report in batches, finish.

Every write a worker makes to a running job is conditional on it still holding the lease
(`lease_owner`), so a worker that lost its job (its lease ran out and another worker took over)
can never overwrite the newer run's state.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, insert, or_, select, update
from sqlalchemy.orm import Session

from tuneforge.db import utcnow
from tuneforge.models.ids import new_id
from tuneforge.models.job import Job, JobEvent, JobStatus


@dataclass(frozen=True)
class EventRecord:
    message: str
    level: str = "info"
    type: str = "message"
    data: dict[str, Any] | None = None
    at: datetime | None = None  # when it happened, if earlier than its (batched) write


@dataclass(frozen=True)
class LeaseState:
    held: bool
    cancel_requested: bool = False
    pause_requested: bool = False


def claim_job(session: Session, job_id: str, owner: str, lease_seconds: float) -> Job | None:
    """Takes the job for one run: queued -> running (or a running job whose lease ran out), with a
    lease and attempt + 1, in one conditional UPDATE. None when someone else has it or it is not
    runnable (a duplicate or late message): the caller exits without training."""
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            or_(
                Job.status == JobStatus.QUEUED.value,
                and_(Job.status == JobStatus.RUNNING.value, Job.lease_expires_at < now),
            ),
        )
        .values(
            status=JobStatus.RUNNING.value,
            lease_owner=owner,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            attempt=Job.attempt + 1,
            updated_at=now,
            started_at=func.coalesce(Job.started_at, now),
        )
        .execution_options(synchronize_session=False)
    )
    if not result.rowcount:  # type: ignore[attr-defined]
        return None
    job = session.get(Job, job_id)
    assert job is not None
    session.refresh(job)
    return job


def renew_lease(session: Session, job_id: str, owner: str, lease_seconds: float) -> LeaseState:
    """Extends the lease and reads the cancel/pause requests, in one statement."""
    now = utcnow()
    row = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == owner, Job.status == JobStatus.RUNNING.value)
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
        .returning(Job.cancel_requested_at, Job.pause_requested_at)
        .execution_options(synchronize_session=False)
    ).first()
    if row is None:
        return LeaseState(held=False)
    return LeaseState(True, row[0] is not None, row[1] is not None)


def add_events(session: Session, job_id: str, events: list[EventRecord]) -> None:
    """Appends many events in two statements: one increment of the job's event counter (which
    hands out their `seq` numbers), one multi-row INSERT."""
    if not events:
        return
    last = session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(last_event_seq=Job.last_event_seq + len(events))
        .returning(Job.last_event_seq)
        .execution_options(synchronize_session=False)
    ).scalar_one()
    first = last - len(events) + 1
    now = utcnow()
    session.execute(
        insert(JobEvent),
        [
            {
                "id": new_id("ftevent-"),
                "job_id": job_id,
                "seq": first + i,
                "created_at": e.at or now,
                "level": e.level,
                "type": e.type,
                "message": e.message,
                "data": e.data,
            }
            for i, e in enumerate(events)
        ],
    )


def update_running(session: Session, job_id: str, owner: str, **values: Any) -> bool:
    """Sets columns of a job this worker runs (progress, params); False when the lease is gone."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == owner, Job.status == JobStatus.RUNNING.value)
        .values(updated_at=utcnow(), **values)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def finish_run(session: Session, job_id: str, owner: str, target: JobStatus, **values: Any) -> bool:
    """running -> `target` for the lease holder, releasing the lease."""
    now = utcnow()
    if target in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED):
        values.setdefault("finished_at", now)
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == owner, Job.status == JobStatus.RUNNING.value)
        .values(
            status=target.value,
            lease_owner=None,
            lease_expires_at=None,
            updated_at=now,
            **values,
        )
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def fail_unclaimed(session: Session, job_id: str, sources: list[JobStatus], error: dict[str, Any]) -> bool:
    """Fails a job no worker holds (validation failures, exhausted attempts)."""
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_([s.value for s in sources]))
        .values(
            status=JobStatus.FAILED.value,
            error=error,
            finished_at=now,
            updated_at=now,
            lease_owner=None,
            lease_expires_at=None,
        )
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def expired_running_jobs(session: Session, now: datetime) -> list[Job]:
    stmt = select(Job).where(Job.status == JobStatus.RUNNING.value, Job.lease_expires_at < now)
    return list(session.scalars(stmt.order_by(Job.lease_expires_at).limit(100)))


def requeue_expired(session: Session, job_id: str, now: datetime) -> bool:
    """A running job whose worker vanished -> queued again (the run task claims it afresh)."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.RUNNING.value, Job.lease_expires_at < now)
        .values(status=JobStatus.QUEUED.value, lease_owner=None, lease_expires_at=None, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def stale_waiting_jobs(session: Session, older_than: datetime) -> list[Job]:
    """queued or validating_files jobs untouched since `older_than`: their message may be lost."""
    stmt = select(Job).where(
        Job.status.in_([JobStatus.QUEUED.value, JobStatus.VALIDATING_FILES.value]),
        Job.updated_at < older_than,
    )
    return list(session.scalars(stmt.order_by(Job.updated_at).limit(500)))


def touch(session: Session, job_id: str, status: str, now: datetime) -> bool:
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == status)
        .values(updated_at=now)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]
