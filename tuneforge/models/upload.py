"""OpenAI's Uploads: a file sent in parts. The upload row says what is coming (name, purpose,
total bytes) and until when; each part row names its object in the store. Completion turns the
parts, in the order the client gives, into an ordinary file."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import BigInteger, ForeignKey, Index, String, delete, func, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from tuneforge.db import Base, UtcDateTime, utcnow
from tuneforge.models.ids import new_id


class UploadStatus(StrEnum):
    PENDING = "pending"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


class Upload(Base):
    __tablename__ = "uploads"
    __table_args__ = (
        Index("ix_uploads_project_id", "project_id"),
        Index("ix_uploads_status_expires_at", "status", "expires_at"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(32))
    mime_type: Mapped[str] = mapped_column(String(255))
    bytes: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)
    file_id: Mapped[str | None] = mapped_column(String(64))


class UploadPart(Base):
    __tablename__ = "upload_parts"
    __table_args__ = (Index("ix_upload_parts_upload_id", "upload_id"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    upload_id: Mapped[str] = mapped_column(ForeignKey("uploads.id", ondelete="CASCADE"))
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    storage_key: Mapped[str] = mapped_column(String(512))


def new_upload_id() -> str:
    return new_id("upload_")


def new_part_id() -> str:
    return new_id("part_")


def add_upload(
    session: Session,
    *,
    project_id: str,
    filename: str,
    purpose: str,
    mime_type: str,
    size: int,
    expires_at: datetime,
) -> Upload:
    row = Upload(
        id=new_upload_id(),
        project_id=project_id,
        filename=filename,
        purpose=purpose,
        mime_type=mime_type,
        bytes=size,
        status=UploadStatus.PENDING.value,
        created_at=utcnow(),
        expires_at=expires_at,
    )
    session.add(row)
    session.flush()
    return row


def get_upload(session: Session, project_id: str, upload_id: str) -> Upload | None:
    return session.scalar(select(Upload).where(Upload.id == upload_id, Upload.project_id == project_id))


def add_part(session: Session, *, part_id: str, upload_id: str, size: int, storage_key: str) -> UploadPart:
    row = UploadPart(
        id=part_id, upload_id=upload_id, bytes=size, created_at=utcnow(), storage_key=storage_key
    )
    session.add(row)
    session.flush()
    return row


def get_parts(session: Session, upload_id: str) -> dict[str, UploadPart]:
    rows = session.scalars(select(UploadPart).where(UploadPart.upload_id == upload_id))
    return {row.id: row for row in rows}


def parts_bytes(session: Session, upload_id: str) -> int:
    total = session.scalar(
        select(func.coalesce(func.sum(UploadPart.bytes), 0)).where(UploadPart.upload_id == upload_id)
    )
    return int(total or 0)


def finish(session: Session, upload_id: str, status: UploadStatus, file_id: str | None = None) -> bool:
    """pending -> `status` (with the file it became); False when the upload was no longer pending
    (completed, cancelled or expired meanwhile)."""
    result = session.execute(
        update(Upload)
        .where(Upload.id == upload_id, Upload.status == UploadStatus.PENDING.value)
        .values(status=status.value, file_id=file_id)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def delete_parts(session: Session, upload_id: str) -> None:
    session.execute(delete(UploadPart).where(UploadPart.upload_id == upload_id))


def expired_pending(session: Session, now: datetime, limit: int) -> list[str]:
    """Ids of pending uploads whose hour ran out."""
    stmt = (
        select(Upload.id)
        .where(Upload.status == UploadStatus.PENDING.value, Upload.expires_at < now)
        .order_by(Upload.expires_at)
        .limit(limit)
    )
    return list(session.scalars(stmt))


def ended_with_parts(session: Session, limit: int) -> list[str]:
    """Ids of uploads no longer pending whose part rows remain. Read from the parts' side: only
    uploads in progress or awaiting clean-up have parts, so the query never walks every upload."""
    stmt = (
        select(UploadPart.upload_id)
        .join(Upload, Upload.id == UploadPart.upload_id)
        .where(Upload.status != UploadStatus.PENDING.value)
        .distinct()
        .limit(limit)
    )
    return list(session.scalars(stmt))
