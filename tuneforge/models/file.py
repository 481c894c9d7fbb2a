"""Uploaded files: metadata rows; the bytes live in the object store under `storage_key`."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, ForeignKey, Index, Integer, String, bindparam, delete, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from tuneforge.db import Base, UtcDateTime, utcnow
from tuneforge.models.ids import new_id

PURPOSE_FINE_TUNE = "fine-tune"
PURPOSE_RESULTS = "fine-tune-results"
FILE_PURPOSES = (PURPOSE_FINE_TUNE, PURPOSE_RESULTS)


class File(Base):
    __tablename__ = "files"
    __table_args__ = (Index("ix_files_project_id_created_at", "project_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    storage_key: Mapped[str] = mapped_column(String(512))
    format: Mapped[str | None] = mapped_column(String(32))
    examples: Mapped[int | None] = mapped_column(Integer)
    approx_tokens: Mapped[int | None] = mapped_column(BigInteger)
    expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    # Which top-level keys its lines have (tuneforge.training.formats.FieldStats); None for files
    # uploaded before it was recorded.
    field_stats: Mapped[dict[str, Any] | None] = mapped_column(JSON)


def new_file_id() -> str:
    return new_id("file-")


def add_file(
    session: Session,
    *,
    file_id: str,
    project_id: str,
    filename: str,
    purpose: str,
    size: int,
    storage_key: str,
    format: str | None = None,
    examples: int | None = None,
    approx_tokens: int | None = None,
    expires_at: datetime | None = None,
    field_stats: dict[str, Any] | None = None,
) -> File:
    """Records a file whose bytes are already in the store."""
    row = File(
        id=file_id,
        project_id=project_id,
        filename=filename,
        purpose=purpose,
        bytes=size,
        created_at=utcnow(),
        storage_key=storage_key,
        format=format,
        examples=examples,
        approx_tokens=approx_tokens,
        expires_at=expires_at,
        field_stats=field_stats,
    )
    session.add(row)
    session.flush()
    return row


_GET_FILE = select(File).where(File.id == bindparam("file_id"), File.project_id == bindparam("project_id"))


def get_file(session: Session, project_id: str, file_id: str) -> File | None:
    return session.scalar(_GET_FILE, {"file_id": file_id, "project_id": project_id})


def list_files(
    session: Session,
    project_id: str,
    *,
    limit: int,
    after: File | None = None,
    purpose: str | None = None,
    ascending: bool = False,
) -> list[File]:
    """Up to `limit` files in (created_at, id) order, after the cursor file when given."""
    stmt = select(File).where(File.project_id == project_id)
    if purpose is not None:
        stmt = stmt.where(File.purpose == purpose)
    if after is not None:
        if ascending:
            stmt = stmt.where(
                (File.created_at > after.created_at)
                | ((File.created_at == after.created_at) & (File.id > after.id))
            )
        else:
            stmt = stmt.where(
                (File.created_at < after.created_at)
                | ((File.created_at == after.created_at) & (File.id < after.id))
            )
    order = (File.created_at.asc(), File.id.asc()) if ascending else (File.created_at.desc(), File.id.desc())
    return list(session.scalars(stmt.order_by(*order).limit(limit)))


def delete_file(session: Session, project_id: str, file_id: str) -> None:
    session.execute(delete(File).where(File.id == file_id, File.project_id == project_id))
