"""The worker's queries on jobs: claim with a lease, renew it, report in batches, finish.

Every write a worker makes to a running job is conditional on it still holding the lease
(`lease_owner`), so a worker that lost its job (its lease ran out and another worker took over)
can never overwrite the newer run's state. Status changes go through the status machine's
`transition` (tuneforge/models/job.py), events through its `append_events`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from tuneforge.db import utcnow
from tuneforge.models.checkpoint import Checkpoint, add_checkpoint, latest_checkpoint, put_artifact
from tuneforge.models.file import PURPOSE_RESULTS, File, add_file
from tuneforge.models.job import (
    WAITING_STATUSES,
    EventRecord,
    Job,
    JobStatus,
    append_events,
    transition,
    update_job_where,
)
from tuneforge.models.project import get_project
from tuneforge.worker.fairshare import fairest_job_query

__all__ = ["EventRecord", "append_events"]  # re-exported for the worker's modules


@dataclass(frozen=True)
class LeaseState:
    held: bool
    cancel_requested: bool = False
    pause_requested: bool = False


class ResumePoint(NamedTuple):
    """The stored checkpoint a run continues from."""

    checkpoint_id: str
    step: int
    storage_key: str  # its adapter archive; the trainer state lies beside it


@dataclass(frozen=True)
class RunPlan:
    """What one attempt at a claimed job needs to know, read in the claim's transaction."""

    job_id: str
    spec: dict[str, Any]
    attempt: int
    max_attempts: int
    model: str
    suffix: str | None
    project_id: str
    project_name: str
    train_key: str
    valid_key: str | None
    resume: ResumePoint | None
    progress: dict[str, Any] | None = None
    """The job's progress as earlier attempts left it."""
    queue: str | None = None
    """The broker queue the job is sent to (a hand-back sends it there again)."""

    @property
    def logged_step(self) -> int:
        """The last step whose metrics an earlier attempt reported: a run resumed from an older
        checkpoint trains those steps again but does not report them again."""
        return int((self.progress or {}).get("step") or 0)


@dataclass(frozen=True)
class StoredArtifact:
    name: str
    storage_key: str
    size: int
    sha256: str
    content_type: str


def _held_by(owner: str) -> tuple[Any, ...]:
    return (Job.lease_owner == owner, Job.status == JobStatus.RUNNING.value)


def claim_job(session: Session, job_id: str, owner: str, lease_seconds: float) -> Job | None:
    """Takes the job for one run: queued -> running (or a running job whose lease ran out), with a
    lease and attempt + 1, and the start event. None when someone else has it or it is not
    runnable (a duplicate or late message): the caller exits without training."""
    now = utcnow()
    checkpoint = latest_checkpoint(session, job_id)
    note = f" from checkpoint at step {checkpoint.step_number}" if checkpoint else ""

    def started(job: Job) -> list[EventRecord]:
        return [EventRecord(f"Fine-tuning job started (attempt {job.attempt}){note}.")]

    if not transition(
        session,
        job_id,
        JobStatus.RUNNING,
        sources=[JobStatus.QUEUED, JobStatus.RUNNING],
        where=[or_(Job.status == JobStatus.QUEUED.value, Job.lease_expires_at < now)],
        events=started,
        lease_owner=owner,
        lease_expires_at=now + timedelta(seconds=lease_seconds),
        attempt=Job.attempt + 1,
        started_at=func.coalesce(Job.started_at, now),
    ):
        return None
    return session.get(Job, job_id)


def claim_run(session: Session, job_id: str, owner: str, lease_seconds: float) -> RunPlan | None:
    """`claim_job`, then everything the run needs: file keys, project name, resume point."""
    job = claim_job(session, job_id, owner, lease_seconds)
    if job is None:
        return None
    checkpoint = latest_checkpoint(session, job_id)
    wanted = [job.training_file, *([job.validation_file] if job.validation_file else [])]
    rows = session.execute(select(File.id, File.storage_key).where(File.id.in_(wanted)))
    keys = {file_id: key for file_id, key in rows}
    project = get_project(session, job.project_id)
    return RunPlan(
        job_id=job_id,
        spec=dict(job.spec),
        attempt=job.attempt,
        max_attempts=job.max_attempts,
        model=job.model,
        suffix=job.suffix,
        project_id=job.project_id,
        project_name=project.name if project is not None else job.project_id,
        train_key=keys[job.training_file],
        valid_key=keys[job.validation_file] if job.validation_file else None,
        resume=ResumePoint(checkpoint.id, checkpoint.step_number, checkpoint.storage_key)
        if checkpoint
        else None,
        progress=dict(job.progress) if job.progress else None,
        queue=job.queue,
    )


def why_not_runnable(session: Session, job_id: str, now: datetime) -> str | None:
    """None when a run message for the job may lead to work; else why not. A message is a claim
    token for its job's queue (tuneforge/worker/fairshare.py), so it may: when its job waits for
    validation or a worker (or its worker's lease ran out), or when another job of the queue
    does. Cheap reads, for the check before a message costs anything."""
    row = session.execute(select(Job.status, Job.lease_expires_at, Job.queue).where(Job.id == job_id)).first()
    if row is None:
        return "no such job"
    status, lease_expires_at, queue = row
    if JobStatus(status) in WAITING_STATUSES:
        return None
    if status == JobStatus.RUNNING and (lease_expires_at is None or lease_expires_at < now):
        return None
    if session.scalar(fairest_job_query(queue, now)) is not None:
        return None
    held = "running on another worker" if status == JobStatus.RUNNING else status
    return f"it is {held} and no other job of its queue waits"


def renew_lease(session: Session, job_id: str, owner: str, lease_seconds: float) -> LeaseState:
    """Extends the lease and reads the cancel/pause requests, in one statement."""
    now = utcnow()
    row = session.execute(
        update(Job)
        .where(Job.id == job_id, *_held_by(owner))
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
        .returning(Job.cancel_requested_at, Job.pause_requested_at)
        .execution_options(synchronize_session=False)
    ).first()
    if row is None:
        return LeaseState(held=False)
    return LeaseState(True, row[0] is not None, row[1] is not None)


def update_running(session: Session, job_id: str, owner: str, **values: Any) -> bool:
    """Sets columns of a job this worker runs (progress, params); False when the lease is gone."""
    return update_job_where(session, job_id, *_held_by(owner), updated_at=utcnow(), **values)


def finish_run(
    session: Session,
    job_id: str,
    owner: str,
    target: JobStatus,
    events: Sequence[EventRecord] = (),
    **values: Any,
) -> bool:
    """running -> `target` for the lease holder, releasing the lease, with its events."""
    return transition(
        session, job_id, target, sources=[JobStatus.RUNNING], owner=owner, events=events, **values
    )


def record_checkpoint(
    session: Session,
    job_id: str,
    *,
    checkpoint_id: str,
    step: int,
    storage_key: str,
    metrics: dict[str, Any],
    keep: int,
) -> list[str]:
    """Adds a stored checkpoint with its event and drops the rows of all but the newest `keep`;
    returns the storage keys of the dropped ones (their bytes are the caller's to delete)."""
    add_checkpoint(
        session,
        job_id,
        step_number=step,
        storage_key=storage_key,
        metrics=metrics,
        checkpoint_id=checkpoint_id,
    )
    append_events(
        session,
        job_id,
        [EventRecord(f"Checkpoint saved at step {step}.", data={"checkpoint": checkpoint_id, "step": step})],
    )
    older = list(
        session.scalars(
            select(Checkpoint)
            .where(Checkpoint.job_id == job_id)
            .order_by(Checkpoint.step_number.desc(), Checkpoint.created_at.desc())
            .offset(keep)
        )
    )
    for row in older:
        session.delete(row)
    return [row.storage_key for row in older]


def record_success(
    session: Session,
    job_id: str,
    owner: str,
    *,
    artifacts: Sequence[StoredArtifact],
    result_file: tuple[str, str, int] | None,
    events: Sequence[EventRecord],
    more_result_files: Sequence[tuple[str, str, int, str]] = (),
    **values: Any,
) -> bool:
    """The run's outputs (artifacts, the metrics CSV as a results file `(id, storage key, size)`,
    then `more_result_files` `(id, storage key, size, filename)`, JSONL) and running -> succeeded,
    in one transaction. False when the lease is gone."""
    job = session.get(Job, job_id)
    if job is None:
        return False
    for file_id, key, size, filename in more_result_files:
        add_file(
            session,
            file_id=file_id,
            project_id=job.project_id,
            filename=filename,
            purpose=PURPOSE_RESULTS,
            size=size,
            storage_key=key,
            format="jsonl",
        )
    if result_file is not None:
        file_id, key, size = result_file
        add_file(
            session,
            file_id=file_id,
            project_id=job.project_id,
            filename="step_metrics.csv",
            purpose=PURPOSE_RESULTS,
            size=size,
            storage_key=key,
            format="csv",
        )
    for artifact in artifacts:
        put_artifact(
            session,
            job_id,
            name=artifact.name,
            storage_key=artifact.storage_key,
            size=artifact.size,
            sha256=artifact.sha256,
            content_type=artifact.content_type,
        )
    return finish_run(
        session,
        job_id,
        owner,
        JobStatus.SUCCEEDED,
        events,
        result_files=([result_file[0]] if result_file else []) + [f[0] for f in more_result_files],
        **values,
    )


def fail_unclaimed(
    session: Session,
    job_id: str,
    sources: Sequence[JobStatus],
    error: dict[str, Any],
    events: Sequence[EventRecord] = (),
) -> bool:
    """Fails a job no worker holds (validation failures, exhausted attempts)."""
    return transition(session, job_id, JobStatus.FAILED, sources=sources, events=events, error=error)


def expired_running_jobs(session: Session, now: datetime) -> list[Job]:
    stmt = select(Job).where(Job.status == JobStatus.RUNNING.value, Job.lease_expires_at < now)
    return list(session.scalars(stmt.order_by(Job.lease_expires_at).limit(100)))


def requeue_expired(session: Session, job_id: str, now: datetime, events: Sequence[EventRecord] = ()) -> bool:
    """A running job whose worker vanished -> queued again (the run task claims it afresh)."""
    return transition(
        session,
        job_id,
        JobStatus.QUEUED,
        sources=[JobStatus.RUNNING],
        where=[Job.lease_expires_at < now],
        events=events,
    )


def stale_waiting_jobs(session: Session, older_than: datetime) -> list[Job]:
    """queued or validating_files jobs untouched since `older_than`: their message may be lost."""
    stmt = select(Job).where(
        Job.status.in_([JobStatus.QUEUED.value, JobStatus.VALIDATING_FILES.value]),
        Job.updated_at < older_than,
    )
    return list(session.scalars(stmt.order_by(Job.updated_at).limit(500)))


def touch(session: Session, job_id: str, status: str, now: datetime) -> bool:
    return update_job_where(session, job_id, Job.status == status, updated_at=now)
