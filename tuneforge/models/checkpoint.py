"""Checkpoints a job wrote during training, and the named artifacts of a job (adapter, model,
merged, ...). Bytes live in the object store under `storage_key`."""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    ForeignKey,
    Index,
    Integer,
    String,
    UniqueConstraint,
    delete,
    exists,
    select,
)
from sqlalchemy.orm import Mapped, Session, mapped_column

from tuneforge.db import Base, UtcDateTime, utcnow
from tuneforge.models.ids import new_id
from tuneforge.models.job import Job


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (Index("ix_checkpoints_job_id_step_number", "job_id", "step_number"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    step_number: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    storage_key: Mapped[str] = mapped_column(String(512))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class Artifact(Base):
    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("job_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(128))
    storage_key: Mapped[str] = mapped_column(String(512))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    content_type: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


def new_checkpoint_id() -> str:
    return new_id("ftckpt-")


def add_checkpoint(
    session: Session,
    job_id: str,
    *,
    step_number: int,
    storage_key: str,
    metrics: dict[str, Any] | None = None,
    checkpoint_id: str | None = None,
) -> Checkpoint:
    row = Checkpoint(
        id=checkpoint_id or new_checkpoint_id(),
        job_id=job_id,
        step_number=step_number,
        metrics=metrics,
        storage_key=storage_key,
        created_at=utcnow(),
    )
    session.add(row)
    session.flush()
    return row


def get_checkpoint(session: Session, job_id: str, checkpoint_id: str) -> Checkpoint | None:
    return session.scalar(
        select(Checkpoint).where(Checkpoint.id == checkpoint_id, Checkpoint.job_id == job_id)
    )


def latest_checkpoint(session: Session, job_id: str) -> Checkpoint | None:
    stmt = (
        select(Checkpoint)
        .where(Checkpoint.job_id == job_id)
        .order_by(Checkpoint.step_number.desc(), Checkpoint.id.desc())
        .limit(1)
    )
    return session.scalar(stmt)


def list_checkpoints(
    session: Session, job_id: str, *, limit: int, after: Checkpoint | None = None
) -> list[Checkpoint]:
    """Newest first: by step number, then id."""
    stmt = select(Checkpoint).where(Checkpoint.job_id == job_id)
    if after is not None:
        stmt = stmt.where(
            (Checkpoint.step_number < after.step_number)
            | ((Checkpoint.step_number == after.step_number) & (Checkpoint.id < after.id))
        )
    stmt = stmt.order_by(Checkpoint.step_number.desc(), Checkpoint.id.desc()).limit(limit)
    return list(session.scalars(stmt))


def jobs_with_checkpoints_ended_before(
    session: Session, statuses: Collection[str], ended_before: datetime, *, limit: int
) -> list[str]:
    """Ids of jobs in one of `statuses` that finished before `ended_before` and still have
    checkpoint rows (oldest finish first)."""
    stmt = (
        select(Job.id)
        .where(
            Job.status.in_(list(statuses)),
            Job.finished_at < ended_before,
            exists().where(Checkpoint.job_id == Job.id),
        )
        .order_by(Job.finished_at, Job.id)
        .limit(limit)
    )
    return list(session.scalars(stmt))


def checkpoint_storage_keys(session: Session, job_id: str) -> list[str]:
    return list(session.scalars(select(Checkpoint.storage_key).where(Checkpoint.job_id == job_id)))


def delete_checkpoints(session: Session, job_id: str) -> None:
    session.execute(delete(Checkpoint).where(Checkpoint.job_id == job_id))


def put_artifact(
    session: Session,
    job_id: str,
    *,
    name: str,
    storage_key: str,
    size: int,
    sha256: str,
    content_type: str,
) -> Artifact:
    """Records an artifact, replacing an earlier one of the same name (a retried job)."""
    row = session.scalar(select(Artifact).where(Artifact.job_id == job_id, Artifact.name == name))
    if row is None:
        row = Artifact(job_id=job_id, name=name)
        session.add(row)
    row.storage_key = storage_key
    row.bytes = size
    row.sha256 = sha256
    row.content_type = content_type
    row.created_at = utcnow()
    session.flush()
    return row


def get_artifact(session: Session, job_id: str, name: str) -> Artifact | None:
    return session.scalar(select(Artifact).where(Artifact.job_id == job_id, Artifact.name == name))


def list_artifacts(session: Session, job_id: str) -> list[Artifact]:
    stmt = select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.created_at, Artifact.name)
    return list(session.scalars(stmt))
