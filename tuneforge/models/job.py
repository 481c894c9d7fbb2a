"""Fine-tuning jobs and their events: tables, the status machine and the queries.

This module is the only place that knows the status names and which changes are allowed. Every
status change goes through `transition`: one conditional UPDATE (`WHERE status IN ...`, and the
lease holder when a worker makes it), so two concurrent changes cannot both win and terminal
states never change; the change's events are appended in the same transaction. Code that must
follow status changes (webhooks, evaluations) hooks in there.

Events are appended one way, `append_events`: their per-job `seq` comes from a counter on the job
row (an atomic increment), which gives them a stable order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
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
    func,
    insert,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Row
from sqlalchemy.orm import Mapped, Session, mapped_column
from sqlalchemy.sql.elements import ColumnElement

from tuneforge.db import Base, Reader, UtcDateTime, utcnow
from tuneforge.models import webhook
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
WAITING_STATUSES = frozenset({JobStatus.VALIDATING_FILES, JobStatus.QUEUED})
"""A worker message may be on its way for these: they are what a worker may start on."""

_ALLOWED: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.VALIDATING_FILES: frozenset({JobStatus.QUEUED, JobStatus.FAILED, JobStatus.CANCELLED}),
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.PAUSED, JobStatus.CANCELLED, JobStatus.FAILED}),
    # running -> queued: a worker died and the job is retried from its last checkpoint.
    # running -> running: another worker takes over a job whose lease ran out.
    JobStatus.RUNNING: frozenset(
        {
            JobStatus.RUNNING,
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
    metadata_: Mapped[dict[str, str] | None] = mapped_column(
        "metadata", JSON().with_variant(JSONB(), "postgresql")
    )
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
    # Lineage (issue 8): a job continued from a fine-tuned model or checkpoint trains on top of
    # its parent's weights; `base_model` is the original base id (None: `model` is the base).
    base_model: Mapped[str | None] = mapped_column(String(512))
    parent_job_id: Mapped[str | None] = mapped_column(String(64))
    parent_checkpoint_id: Mapped[str | None] = mapped_column(String(64))
    model_deleted_at: Mapped[datetime | None] = mapped_column(UtcDateTime)

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
    Job.base_model,
    Job.parent_job_id,
    Job.parent_checkpoint_id,
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
        stmt = stmt.where(_metadata_equals(session, key, value))
    if after is not None:
        stmt = stmt.where(
            (Job.created_at < after.created_at) | ((Job.created_at == after.created_at) & (Job.id < after.id))
        )
    stmt = stmt.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)
    return list(session.scalars(stmt))


def _metadata_equals(session: Session, key: str, value: str) -> ColumnElement[bool]:
    """`metadata[key] == value`. SQLite's JSON paths cannot name a key holding a double quote
    (`$."a"]"` is a path error), so there such a key is matched through json_each."""
    if '"' in key and session.get_bind().dialect.name == "sqlite":
        pairs = func.json_each(Job.metadata_).table_valued("key", "value")
        return select(1).select_from(pairs).where(pairs.c.key == key, pairs.c.value == value).exists()
    return Job.metadata_[key].as_string() == value


def list_fine_tuned_models(session: Session, project_id: str) -> list[tuple[str, datetime]]:
    """(fine_tuned_model, finished_at or created_at) of the project's jobs that produced a model."""
    stmt = (
        select(Job.fine_tuned_model, Job.finished_at, Job.created_at)
        .where(
            Job.project_id == project_id, Job.fine_tuned_model.is_not(None), Job.model_deleted_at.is_(None)
        )
        .order_by(Job.created_at, Job.id)
    )
    return [(name, finished or created) for name, finished, created in session.execute(stmt) if name]


def find_fine_tuned_model(session: Session, project_id: str, model_id: str) -> Job | None:
    """The project's job that produced `model_id`, unless that model was deleted."""
    stmt = (
        select(Job)
        .where(
            Job.project_id == project_id,
            Job.fine_tuned_model == model_id,
            Job.model_deleted_at.is_(None),
        )
        .limit(1)
    )
    return session.scalar(stmt)


@dataclass(frozen=True)
class EventRecord:
    """An event to append to a job's log."""

    message: str
    level: str = "info"
    type: str = "message"
    data: dict[str, Any] | None = None
    at: datetime | None = None  # when it happened, if earlier than its (batched) write


def append_events(session: Session, job_id: str, events: Sequence[EventRecord]) -> list[str]:
    """Appends events in two statements: one increment of the job's event counter (which hands
    out their `seq` numbers and serialises concurrent writers of the same job's events), one
    multi-row INSERT. Returns the new events' ids."""
    if not events:
        return []
    last = session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(last_event_seq=Job.last_event_seq + len(events))
        .returning(Job.last_event_seq)
        .execution_options(synchronize_session=False)
    ).scalar_one()
    first = last - len(events) + 1
    now = utcnow()
    ids = [new_id("ftevent-") for _ in events]
    session.execute(
        insert(JobEvent),
        [
            {
                "id": event_id,
                "job_id": job_id,
                "seq": first + i,
                "created_at": e.at or now,
                "level": e.level,
                "type": e.type,
                "message": e.message,
                "data": e.data,
            }
            for i, (event_id, e) in enumerate(zip(ids, events, strict=True))
        ],
    )
    return ids


def add_job(session: Session, job: Job, messages: list[str]) -> Job:
    """Adds a new job with its first events."""
    job.last_event_seq = 0
    session.add(job)
    session.flush()
    append_events(session, job.id, [EventRecord(message) for message in messages])
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


def list_events_after_seq(session: Session, job_id: str, after_seq: int, *, limit: int) -> list[JobEvent]:
    """Oldest first (by seq): the job's events written after the one numbered `after_seq` (the
    live event stream)."""
    stmt = select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.seq > after_seq)
    return list(session.scalars(stmt.order_by(JobEvent.seq).limit(limit)))


def update_job_where(session: Session, job_id: str, *conditions: Any, **values: Any) -> bool:
    """`UPDATE jobs SET values WHERE id = job_id AND conditions`; whether a row changed. Every
    conditional write to a job goes through here (status changes through `transition`)."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, *conditions)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


JobEvents = Sequence[EventRecord] | Callable[[Job], Sequence[EventRecord]]
"""The events of a status change: a list, or a function of the changed job (for events that
name what the change wrote, such as the attempt number)."""


def transition(
    session: Session,
    job_id: str,
    target: JobStatus,
    *,
    sources: Iterable[JobStatus] | None = None,
    owner: str | None = None,
    where: Iterable[ColumnElement[bool]] = (),
    events: JobEvents = (),
    **values: Any,
) -> bool:
    """The one way a job's status changes. Moves the job to `target` if its status is one of
    `sources` (default: every status the machine allows to reach `target`), it is held by
    `owner` (when given: a worker's lease) and the extra `where` conditions hold; sets `values`
    in the same UPDATE and appends `events` in the same transaction. Returns whether it won.

    A terminal job never changes, whatever `sources` says; reaching a terminal status sets
    `finished_at`; leaving `running` releases the lease."""
    allowed = sources_of(target) if sources is None else frozenset(sources) & sources_of(target)
    now = utcnow()
    if target in TERMINAL_STATUSES:
        values.setdefault("finished_at", now)
    if target is not JobStatus.RUNNING:
        values.setdefault("lease_owner", None)
        values.setdefault("lease_expires_at", None)
    conditions = [Job.status.in_([s.value for s in allowed]), *where]
    if owner is not None:
        conditions.append(Job.lease_owner == owner)
    if not update_job_where(session, job_id, *conditions, status=target.value, updated_at=now, **values):
        return False
    if callable(events):
        job = session.get(Job, job_id, populate_existing=True)
        assert job is not None
        events = events(job)
    elif (job := _cached(session, job_id)) is not None:
        session.refresh(job)
    append_events(session, job_id, events)
    if target in TERMINAL_STATUSES:
        _enqueue_webhooks(session, job_id, target)
    return True


def _enqueue_webhooks(session: Session, job_id: str, target: JobStatus) -> None:
    """A final status is a webhook event (`fine_tuning.job.<status>`): its deliveries are written
    to the outbox in this transaction (tuneforge/models/webhook.py)."""
    project_id = session.scalar(select(Job.project_id).where(Job.id == job_id))
    if project_id is not None:
        webhook.enqueue_event(session, project_id, f"fine_tuning.job.{target.value}", {"id": job_id})


def _cached(session: Session, job_id: str) -> Job | None:
    """The session's object for the job, if it holds one (without loading it)."""
    job = session.identity_map.get(session.identity_key(Job, job_id))
    return job if isinstance(job, Job) else None


def _refresh(session: Session, job: Job) -> Job:
    session.refresh(job)
    return job


def _refuse(job: Job, action: str, why: str) -> InvalidTransition:
    return InvalidTransition(f"Job {job.id} cannot be {action}: {why}.", job_id=job.id, status=job.status)


def _finished_reason(job: Job) -> str:
    return f"it has already {job.status}" if job.status != JobStatus.CANCELLED else "it is already cancelled"


def _request_of_running(session: Session, job: Job, column: str, message: str) -> bool:
    """Records a cancel or pause request (`column`) on a running job that has none yet, with its
    event; False when the job stopped running or another request won the race. The worker acts
    on it."""
    now = utcnow()
    if not update_job_where(
        session,
        job.id,
        Job.status == JobStatus.RUNNING.value,
        getattr(Job, column).is_(None),
        **{column: now, "updated_at": now},
    ):
        return False
    append_events(session, job.id, [EventRecord(message)])
    return True


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
            if _request_of_running(
                session, job, "cancel_requested_at", "Cancellation requested; the job stops at its next step."
            ):
                return _refresh(session, job)
        elif transition(
            session,
            job.id,
            JobStatus.CANCELLED,
            sources=[JobStatus.VALIDATING_FILES, JobStatus.QUEUED, JobStatus.PAUSED],
            events=[EventRecord("Job cancelled.")],
        ):
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
            if _request_of_running(
                session, job, "pause_requested_at", "Pause requested; the job checkpoints and pauses."
            ):
                return _refresh(session, job)
        elif transition(
            session, job.id, JobStatus.PAUSED, sources=[JobStatus.QUEUED], events=[EventRecord("Job paused.")]
        ):
            return _refresh(session, job)
        _refresh(session, job)
    raise _refuse(job, "paused", f"its status keeps changing (now {job.status})")


def resume_job(session: Session, job: Job) -> Job:
    """paused -> queued. The caller enqueues the job after the commit."""
    if JobStatus(job.status) is not JobStatus.PAUSED:
        why = _finished_reason(job) if JobStatus(job.status).is_terminal else f"it is {job.status}"
        raise _refuse(job, "resumed", f"only a paused job can be resumed and {why}")
    if not transition(
        session,
        job.id,
        JobStatus.QUEUED,
        sources=[JobStatus.PAUSED],
        events=[EventRecord("Job resumed.")],
        pause_requested_at=None,
    ):
        _refresh(session, job)
        raise _refuse(job, "resumed", f"only a paused job can be resumed and it is now {job.status}")
    return _refresh(session, job)
