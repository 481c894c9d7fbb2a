"""Retention: checkpoints of jobs that failed or were cancelled are deleted, rows and objects,
`checkpoint_retention_days` after the job ended. Nothing can resume such a job, so its
checkpoints only serve downloads; a succeeded job keeps its own (the newest `keep_checkpoints`).

The sweep runs on the reconciler's schedule, at most once per `SWEEP_EVERY_SECONDS` in a process.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta

from sqlalchemy.orm import Session, sessionmaker

from tuneforge.config import Settings
from tuneforge.db import session_scope, utcnow
from tuneforge.models.checkpoint import (
    checkpoint_storage_keys,
    delete_checkpoints,
    jobs_with_checkpoints_ended_before,
)
from tuneforge.models.job import JobStatus
from tuneforge.storage import ObjectStore, store_from_settings
from tuneforge.storage.keys import CheckpointKeys, job_checkpoints_prefix

log = logging.getLogger(__name__)

EXPIRING_STATUSES = (JobStatus.FAILED, JobStatus.CANCELLED)
SWEEP_EVERY_SECONDS = 3600.0
_BATCH = 100

_last_sweep: float | None = None


def sweep_expired_checkpoints(
    settings: Settings, sessions: sessionmaker[Session], store: ObjectStore, now: datetime | None = None
) -> list[str]:
    """Deletes the checkpoints of failed and cancelled jobs that ended more than the retention
    period ago; returns the ids of the jobs swept. Objects go first, then rows: a pass that fails
    half-way leaves rows behind, so the next pass finds the job again."""
    if settings.checkpoint_retention_days <= 0:
        return []
    ended_before = (now or utcnow()) - timedelta(days=settings.checkpoint_retention_days)
    swept: list[str] = []
    while True:
        with session_scope(sessions) as session:
            job_ids = jobs_with_checkpoints_ended_before(
                session, [s.value for s in EXPIRING_STATUSES], ended_before, limit=_BATCH
            )
        if not job_ids:
            return swept
        for job_id in job_ids:
            _delete_objects(store, job_id, sessions)
            with session_scope(sessions) as session:
                delete_checkpoints(session, job_id)
            swept.append(job_id)
        log.info("retention: deleted the checkpoints of %d ended jobs", len(job_ids))


def _delete_objects(store: ObjectStore, job_id: str, sessions: sessionmaker[Session]) -> None:
    with session_scope(sessions) as session:
        keys = checkpoint_storage_keys(session, job_id)
    for key in keys:
        try:
            store.delete_prefix(CheckpointKeys.parse(key).prefix)
        except ValueError:  # a key outside the usual layout: delete what the row names
            store.delete(key)
    store.delete_prefix(job_checkpoints_prefix(job_id))  # anything a crash left without a row


def sweep_if_due(settings: Settings, sessions: sessionmaker[Session]) -> list[str]:
    """The reconciler's hook: runs the sweep when the last one in this process is an interval
    old. A failure is logged and never stops the caller."""
    global _last_sweep
    if settings.checkpoint_retention_days <= 0:
        return []
    if _last_sweep is not None and time.monotonic() - _last_sweep < SWEEP_EVERY_SECONDS:
        return []
    _last_sweep = time.monotonic()
    try:
        return sweep_expired_checkpoints(settings, sessions, store_from_settings(settings))
    except Exception:
        log.exception("retention sweep failed; the next one retries")
        return []
