"""Fine-tuning jobs and their events: tables, the status machine and the queries.

Status changes go through `change_status`, a conditional UPDATE (`WHERE status IN ...`), so two
concurrent changes cannot both win; terminal states never change. Events carry a per-job `seq`
taken from a counter on the job row (an atomic increment), which gives them a stable order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    bindparam,
    select,
    update,
)
from sqlalchemy.engine import Row
from sqlalchemy.orm import Mapped, Session, mapped_column

from tuneforge.db import Base, Reader, UtcDateTime, utcnow
from tuneforge.models.ids import new_id

DEFAULT_QUEUE = "default"
DEFAULT_MAX_ATTEMPTS = 3


class JobStatus(StrEnum):
    VALIDATING_FILES = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})

_ALLOWED: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.VALIDATING_FILES: frozenset({JobStatus.QUEUED, JobStatus.FAILED, JobStatus.CANCELLED}),
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.PAUSED, JobStatus.CANCELLED, JobStatus.FAILED}),
    # running -> queued: a worker died and the job is retried from its last checkpoint.
    JobStatus.RUNNING: frozenset(
        {
            JobStatus.SUCCEEDED,
            JobStatus.FAILED,
            JobStatus.CANCELLED,
            JobStatus.PAUSED,
            JobStatus.QUEUED,
        }
    ),
    JobStatus.PAUSED: frozenset({JobStatus.QUEUED, JobStatus.CANCELLED, JobStatus.FAILED}),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}


def can_transition(current: JobStatus | str, target: JobStatus | str) -> bool:
    """Whether the status machine allows `current -> target`. Terminal states allow nothing."""
    return JobStatus(target) in _ALLOWED[JobStatus(current)]


def sources_of(target: JobStatus) -> frozenset[JobStatus]:
    """Every status from which `target` may be reached."""
    return frozenset(s for s, targets in _ALLOWED.items() if target in targets)


class InvalidTransition(Exception):
    """A refused status change (the API answers 400 with this message)."""

    def __init__(self, message: str, *, job_id: str, status: str) -> None:
        super().__init__(message)
        self.message = message
        self.job_id = job_id
        self.status = status


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_project_id_created_at", "project_id", "created_at"),
        Index("ix_jobs_status", "status"),
        Index("ix_jobs_lease_expires_at", "lease_expires_at"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    model: Mapped[str] = mapped_column(String(512))
    status: Mapped[str] = mapped_column(String(32))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    training_file: Mapped[str] = mapped_column(String(64))
    validation_file: Mapped[str | None] = mapped_column(String(64))
    suffix: Mapped[str | None] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(BigInteger)
    metadata_: Mapped[dict[str, str] | None] = mapped_column("metadata", JSON)
    queue: Mapped[str] = mapped_column(String(64), default=DEFAULT_QUEUE)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger)
    trainable_params: Mapped[int | None] = mapped_column(BigInteger)
    total_params: Mapped[int | None] = mapped_column(BigInteger)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(512))
    result_files: Mapped[list[str] | None] = mapped_column(JSON)
    estimate: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    cancel_requested_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    pause_requested_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=DEFAULT_MAX_ATTEMPTS)
    lease_owner: Mapped[str | None] = mapped_column(String(256))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    resume_checkpoint_id: Mapped[str | None] = mapped_column(String(64))
    last_event_seq: Mapped[int] = mapped_column(Integer, default=0)

    @property
    def job_status(self) -> JobStatus:
        return JobStatus(self.status)


class JobEvent(Base):
    __tablename__ = "job_events"
    __table_args__ = (UniqueConstraint("job_id", "seq"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    level: Mapped[str] = mapped_column(String(16), default="info")
    type: Mapped[str] = mapped_column(String(16), default="message")
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)


# --- queries -------------------------------------------------------------------------------------


def new_job_id() -> str:
    return new_id("ftjob-")


_GET_JOB = select(Job).where(Job.id == bindparam("job_id"), Job.project_id == bindparam("project_id"))


def get_job(session: Session, project_id: str, job_id: str) -> Job | None:
    """The caller's job (the hot path of the API: a statement built once, bound per call)."""
    return session.scalar(_GET_JOB, {"job_id": job_id, "project_id": project_id})


JobView = Job | Row[Any]
"""A Job, or a row of JOB_VIEW_COLUMNS (SQLAlchemy's Row, or psycopg's named tuple from the
`Reader`): all answer the attributes `job_object` reads."""

# What the API shows of a job: a Core row of these columns reads like a Job (same attribute
# names), for the hot GET path where building an ORM object is most of the cost.
JOB_VIEW_COLUMNS = (
    Job.id,
    Job.project_id,
    Job.model,
    Job.status,
    Job.spec,
    Job.training_file,
    Job.validation_file,
    Job.suffix,
    Job.seed,
    Job.metadata_.label("metadata_"),
    Job.created_at,
    Job.updated_at,
    Job.finished_at,
    Job.error,
    Job.progress,
    Job.trained_tokens,
    Job.trainable_params,
    Job.total_params,
    Job.fine_tuned_model,
    Job.result_files,
    Job.estimate,
)
_GET_JOB_VIEW = select(*JOB_VIEW_COLUMNS).where(
    Job.id == bindparam("job_id"), Job.project_id == bindparam("project_id")
)


async def read_job_view(reader: Reader, project_id: str, job_id: str) -> JobView | None:
    """The caller's job as a read-only row with the Job attribute names of JOB_VIEW_COLUMNS."""
    row: JobView | None = await reader.first(_GET_JOB_VIEW, {"job_id": job_id, "project_id": project_id})
    return row


def get_job_any_project(session: Session, job_id: str) -> Job | None:
    """For the worker, which is not scoped to a project."""
    return session.get(Job, job_id)


def list_jobs(
    session: Session,
    project_id: str,
    *,
    limit: int,
    after: Job | None = None,
    metadata: Mapping[str, str] | None = None,
) -> list[Job]:
    """Newest first, ordered by (created_at, id) so pages are stable; `metadata` filters by equality
    of each pair (a SQL JSON comparison on both backends)."""
    stmt = select(Job).where(Job.project_id == project_id)
    for key, value in (metadata or {}).items():
        stmt = stmt.where(Job.metadata_[key].as_string() == value)
    if after is not None:
        stmt = stmt.where(
            (Job.created_at < after.created_at) | ((Job.created_at == after.created_at) & (Job.id < after.id))
        )
    stmt = stmt.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)
    return list(session.scalars(stmt))


def list_fine_tuned_models(session: Session, project_id: str) -> list[tuple[str, datetime]]:
    """(fine_tuned_model, finished_at or created_at) of the project's jobs that produced a model."""
    stmt = (
        select(Job.fine_tuned_model, Job.finished_at, Job.created_at)
        .where(Job.project_id == project_id, Job.fine_tuned_model.is_not(None))
        .order_by(Job.created_at, Job.id)
    )
    return [(name, finished or created) for name, finished, created in session.execute(stmt) if name]


def find_fine_tuned_model(session: Session, project_id: str, model_id: str) -> Job | None:
    stmt = select(Job).where(Job.project_id == project_id, Job.fine_tuned_model == model_id).limit(1)
    return session.scalar(stmt)


def add_event(
    session: Session,
    job_id: str,
    message: str,
    *,
    level: str = "info",
    type: str = "message",
    data: dict[str, Any] | None = None,
) -> JobEvent:
    """Appends an event; its `seq` comes from an atomic increment of the job's counter (which also
    serialises concurrent writers of the same job's events)."""
    seq = session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(last_event_seq=Job.last_event_seq + 1)
        .returning(Job.last_event_seq)
        .execution_options(synchronize_session=False)
    ).scalar_one()
    event = JobEvent(
        id=new_id("ftevent-"),
        job_id=job_id,
        seq=seq,
        created_at=utcnow(),
        level=level,
        type=type,
        message=message,
        data=data,
    )
    session.add(event)
    session.flush()
    return event


def add_job(session: Session, job: Job, messages: list[str]) -> Job:
    """Adds a new job with its first events in one flush (two INSERTs): the events take seq
    1..n and the job's counter starts at n."""
    job.last_event_seq = len(messages)
    session.add(job)
    session.flush()
    now = utcnow()
    session.add_all(
        JobEvent(
            id=new_id("ftevent-"),
            job_id=job.id,
            seq=seq,
            created_at=now,
            level="info",
            type="message",
            message=message,
        )
        for seq, message in enumerate(messages, start=1)
    )
    session.flush()
    return job


def get_event(session: Session, job_id: str, event_id: str) -> JobEvent | None:
    return session.scalar(select(JobEvent).where(JobEvent.id == event_id, JobEvent.job_id == job_id))


def list_events(
    session: Session, job_id: str, *, limit: int, after: JobEvent | None = None
) -> list[JobEvent]:
    """Newest first (by seq)."""
    stmt = select(JobEvent).where(JobEvent.job_id == job_id)
    if after is not None:
        stmt = stmt.where(JobEvent.seq < after.seq)
    return list(session.scalars(stmt.order_by(JobEvent.seq.desc()).limit(limit)))


def change_status(
    session: Session,
    job_id: str,
    target: JobStatus,
    *,
    sources: Iterable[JobStatus] | None = None,
    **values: Any,
) -> bool:
    """Moves the job to `target` if its status is one of `sources` (default: every status the
    machine allows to reach `target`); sets `values` in the same UPDATE. Returns whether it won.
    A terminal job never changes, whatever `sources` says."""
    allowed = sources_of(target) if sources is None else frozenset(sources) & sources_of(target)
    now = utcnow()
    if target in TERMINAL_STATUSES:
        values.setdefault("finished_at", now)
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_([s.value for s in allowed]))
        .values(status=target.value, updated_at=now, **values)
        .execution_options(synchronize_session=False)
    )
    won = bool(result.rowcount)  # type: ignore[attr-defined]
    if won:
        job = session.get(Job, job_id)
        if job is not None:
            session.refresh(job)
    return won


def _refresh(session: Session, job: Job) -> Job:
    session.refresh(job)
    return job


def _refuse(job: Job, action: str, why: str) -> InvalidTransition:
    return InvalidTransition(f"Job {job.id} cannot be {action}: {why}.", job_id=job.id, status=job.status)


def _finished_reason(job: Job) -> str:
    return f"it has already {job.status}" if job.status != JobStatus.CANCELLED else "it is already cancelled"


def _request_of_running(session: Session, job: Job, column: str) -> bool:
    """Records a cancel or pause request (`column`) on a running job that has none yet; False when
    the job stopped running or another request won the race. The worker acts on it."""
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(
            Job.id == job.id,
            Job.status == JobStatus.RUNNING.value,
            getattr(Job, column).is_(None),
        )
        .values({column: now, "updated_at": now})
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def cancel_job(session: Session, job: Job) -> Job:
    """validating_files/queued/paused -> cancelled at once; running -> records the request for the
    worker (which stops and sets cancelled). Refuses a finished job."""
    for _ in range(3):
        status = JobStatus(job.status)
        if status.is_terminal:
            raise _refuse(job, "cancelled", _finished_reason(job))
        if status is JobStatus.RUNNING:
            if job.cancel_requested_at is not None:
                return job
            if _request_of_running(session, job, "cancel_requested_at"):
                add_event(session, job.id, "Cancellation requested; the job stops at its next step.")
                return _refresh(session, job)
        elif change_status(
            session,
            job.id,
            JobStatus.CANCELLED,
            sources=[JobStatus.VALIDATING_FILES, JobStatus.QUEUED, JobStatus.PAUSED],
        ):
            add_event(session, job.id, "Job cancelled.")
            return _refresh(session, job)
        _refresh(session, job)  # lost a race: look again
    raise _refuse(job, "cancelled", f"its status keeps changing (now {job.status})")


def pause_job(session: Session, job: Job) -> Job:
    """queued -> paused at once; running -> records the request (the worker checkpoints and
    sets paused)."""
    for _ in range(3):
        status = JobStatus(job.status)
        if status.is_terminal:
            raise _refuse(job, "paused", _finished_reason(job))
        if status is JobStatus.PAUSED:
            raise _refuse(job, "paused", "it is already paused")
        if status is JobStatus.VALIDATING_FILES:
            raise _refuse(job, "paused", "its files are still being validated")
        if status is JobStatus.RUNNING:
            if job.pause_requested_at is not None:
                return job
            if _request_of_running(session, job, "pause_requested_at"):
                add_event(session, job.id, "Pause requested; the job checkpoints and pauses.")
                return _refresh(session, job)
        elif change_status(session, job.id, JobStatus.PAUSED, sources=[JobStatus.QUEUED]):
            add_event(session, job.id, "Job paused.")
            return _refresh(session, job)
        _refresh(session, job)
    raise _refuse(job, "paused", f"its status keeps changing (now {job.status})")


def resume_job(session: Session, job: Job) -> Job:
    """paused -> queued. The caller enqueues the job after the commit."""
    if JobStatus(job.status) is not JobStatus.PAUSED:
        why = _finished_reason(job) if JobStatus(job.status).is_terminal else f"it is {job.status}"
        raise _refuse(job, "resumed", f"only a paused job can be resumed and {why}")
    if not change_status(
        session,
        job.id,
        JobStatus.QUEUED,
        sources=[JobStatus.PAUSED],
        pause_requested_at=None,
        lease_owner=None,
        lease_expires_at=None,
    ):
        _refresh(session, job)
        raise _refuse(job, "resumed", f"only a paused job can be resumed and it is now {job.status}")
    add_event(session, job.id, "Job resumed.")
    return _refresh(session, job)
