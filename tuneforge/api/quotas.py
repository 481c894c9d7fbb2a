"""Per-project quotas: jobs not yet finished, and bytes of stored files.

Both are checked inside the transaction that adds the job or the file, after taking a lock on the
project's row (PostgreSQL: `SELECT ... FOR UPDATE`; SQLite: a write to the row, which takes the
database's write lock), so two requests racing past the limit are counted one after the other:
the second sees the first's row once the first commits. The lock is taken last, just before the
insert, so it is held only for the count and the insert, not for the checks before them.

Answers follow OpenAI's: over the job quota is a 429 `rate_limit_exceeded` with
`x-should-retry: false` (waiting does not help until a job finishes, so the SDK must not retry);
over the storage quota is a 413 `storage_quota_exceeded` on the upload, as for a file over the
size limit: this upload does not fit until files are deleted, and the SDK does not retry a 413.
"""

from __future__ import annotations

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from tuneforge.api.errors import PayloadTooLarge, RateLimitExceeded
from tuneforge.config import Settings
from tuneforge.models.file import File
from tuneforge.models.job import TERMINAL_STATUSES, Job
from tuneforge.models.project import Project

ACTIVE_STATUSES_NOT = tuple(s.value for s in TERMINAL_STATUSES)


class QuotaExceeded(RateLimitExceeded):
    """429 with OpenAI's rate-limit code, not to be retried: a quota frees up only when the
    project's own work finishes."""

    type = "invalid_request_error"
    headers = {"x-should-retry": "false"}


class StorageQuotaExceeded(PayloadTooLarge):
    def __init__(self, message: str, **kwargs: object) -> None:
        kwargs.setdefault("code", "storage_quota_exceeded")
        kwargs.setdefault("param", "file")
        super().__init__(message, **kwargs)


def lock_project(session: Session, project_id: str) -> None:
    """Serialises quota checks of one project until the transaction ends. On PostgreSQL a
    `FOR NO KEY UPDATE` row lock: two quota checks wait for each other, while inserts that only
    reference the project (their foreign-key check takes `KEY SHARE`) go on."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(Project.id).where(Project.id == project_id).with_for_update(key_share=True))
    else:
        session.execute(
            update(Project)
            .where(Project.id == project_id)
            .values(name=Project.name)
            .execution_options(synchronize_session=False)
        )


def active_jobs(session: Session, project_id: str) -> int:
    """Jobs of the project that have not finished: validating_files, queued, running, paused."""
    stmt = (
        select(func.count())
        .select_from(Job)
        .where(Job.project_id == project_id, Job.status.not_in(ACTIVE_STATUSES_NOT))
    )
    return int(session.scalar(stmt) or 0)


def stored_bytes(session: Session, project_id: str) -> int:
    stmt = select(func.coalesce(func.sum(File.bytes), 0)).where(File.project_id == project_id)
    return int(session.scalar(stmt) or 0)


def reserve_active_job(session: Session, settings: Settings, project_id: str) -> None:
    """Call just before adding a job: raises `QuotaExceeded` when the project already has
    `max_active_jobs_per_project` unfinished jobs; otherwise the project stays locked until the
    transaction that adds the job commits."""
    limit = settings.max_active_jobs_per_project
    if not limit:
        return
    lock_project(session, project_id)
    active = active_jobs(session, project_id)
    if active >= limit:
        raise QuotaExceeded(
            f"This fine-tune request has been rate-limited. Your project has reached the maximum of "
            f"{limit} active or queued fine-tuning jobs ({active} now); create more when some finish "
            "or cancel one."
        )


def check_storage(
    session: Session, settings: Settings, project_id: str, incoming: int, *, lock: bool = True
) -> None:
    """Raises `StorageQuotaExceeded` when `incoming` more bytes would put the project's files
    over `max_stored_bytes_per_project`. With `lock`, the project stays locked until the
    transaction that records the file commits; without, it is a cheap early refusal before the
    body is read."""
    limit = settings.max_stored_bytes_per_project
    if not limit:
        return
    if lock:
        lock_project(session, project_id)
    used = stored_bytes(session, project_id)
    if used + incoming > limit:
        raise StorageQuotaExceeded(
            f"This upload of {incoming:,} bytes would put your project's files at {used + incoming:,} "
            f"bytes, over its storage limit of {limit:,} bytes; delete files you no longer need."
        )
