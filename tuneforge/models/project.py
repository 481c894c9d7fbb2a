"""Projects and their API keys. Only a SHA-256 hash of each key is stored."""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime

from sqlalchemy import ForeignKey, String, bindparam, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from tuneforge.db import Base, Reader, UtcDateTime, utcnow
from tuneforge.models.ids import new_id

DEFAULT_PROJECT_ID = "default"
API_KEY_PREFIX = "tf-"


class Project(Base):
    __tablename__ = "projects"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime, default=None)


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode()).hexdigest()


def create_project(session: Session, name: str) -> Project:
    project = Project(id=new_id("proj-"), name=name, created_at=utcnow())
    session.add(project)
    session.flush()
    return project


def get_project(session: Session, project_id: str) -> Project | None:
    return session.get(Project, project_id)


def ensure_default_project(session: Session) -> Project:
    """The built-in project the admin key acts as (the migration creates it; this is a safety net)."""
    project = session.get(Project, DEFAULT_PROJECT_ID)
    if project is None:
        project = Project(id=DEFAULT_PROJECT_ID, name="default", created_at=utcnow())
        session.add(project)
        session.flush()
    return project


def list_projects(session: Session) -> list[Project]:
    return list(session.scalars(select(Project).order_by(Project.created_at, Project.id)))


def create_api_key(session: Session, project_id: str) -> tuple[ApiKey, str]:
    """A new key for the project; returns the row and the plaintext, which is never stored."""
    plaintext = API_KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(
        id=new_id("key-"),
        project_id=project_id,
        key_hash=hash_key(plaintext),
        prefix=plaintext[:10],
        created_at=utcnow(),
    )
    session.add(key)
    session.flush()
    return key, plaintext


def list_api_keys(session: Session, project_id: str) -> list[ApiKey]:
    stmt = select(ApiKey).where(ApiKey.project_id == project_id).order_by(ApiKey.created_at, ApiKey.id)
    return list(session.scalars(stmt))


def revoke_api_key(session: Session, project_id: str, key_id: str) -> ApiKey | None:
    key = session.scalar(select(ApiKey).where(ApiKey.id == key_id, ApiKey.project_id == project_id))
    if key is None:
        return None
    session.execute(
        update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None)).values(revoked_at=utcnow())
    )
    session.refresh(key)
    return key


_KEY_FOR_HASH = select(ApiKey.key_hash, ApiKey.project_id).where(
    ApiKey.key_hash == bindparam("key_hash"), ApiKey.revoked_at.is_(None)
)


async def read_key_for_hash(reader: Reader, key_hash: str) -> tuple[str, str] | None:
    """(key_hash, project_id) of the active key with this hash, or None: an index probe."""
    row = await reader.first(_KEY_FOR_HASH, {"key_hash": key_hash})
    return (row[0], row[1]) if row else None
