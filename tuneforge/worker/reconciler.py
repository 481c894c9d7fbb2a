"""The periodic reconciler (Celery beat): the database says what should be running, the broker
may have forgotten. It re-sends queued (and validating) jobs whose message was lost, and takes
back running jobs whose lease ran out (their worker died): they run again from their last stored
checkpoint, up to `max_attempts` runs, then fail with a clear error. It also expires Uploads API
uploads left pending past their hour and removes the parts of ended ones."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy.orm import Session, sessionmaker

from tuneforge.config import Settings
from tuneforge.db import session_scope, utcnow
from tuneforge.models import upload as uploads
from tuneforge.models.checkpoint import latest_checkpoint
from tuneforge.models.job import Job, JobStatus
from tuneforge.storage import ObjectStore, store_from_settings
from tuneforge.storage.keys import upload_prefix
from tuneforge.worker import jobstate
from tuneforge.worker.jobstate import EventRecord

log = logging.getLogger(__name__)


Examined = tuple[str, str | None] | None
"""What examining one job did: (what, the queue to send it to or None), or None for nothing."""


def reconcile(
    settings: Settings, sessions: sessionmaker[Session], send: Callable[[str, str], None]
) -> dict[str, list[str]]:
    """One pass. `send(job_id, queue)` enqueues a run task. Returns the job ids acted on, and
    those that went wrong: one job can never stop the pass. Each job is examined in a
    transaction of its own (one that raises is logged, listed under `errors` and left for the
    next pass); each send is tried on its own (one that fails is logged and listed under
    `send_failed`; the job waits in the database and a later pass sends it again)."""
    now = utcnow()
    done: dict[str, list[str]] = {"requeued": [], "resent": [], "failed": [], "errors": [], "send_failed": []}
    with session_scope(sessions) as session:
        expired = [job.id for job in jobstate.expired_running_jobs(session, now)]
        stale_before = now - timedelta(seconds=settings.queued_stale_seconds)
        stale = [job.id for job in jobstate.stale_waiting_jobs(session, stale_before)]
    to_send: list[tuple[str, str]] = []
    for job_id, examine in [*((j, _take_back) for j in expired), *((j, _resend) for j in stale)]:
        try:
            with session_scope(sessions) as session:
                outcome = examine(session, job_id, now)
        except Exception:
            log.exception("reconciler: examining job %s failed; the next pass looks again", job_id)
            done["errors"].append(job_id)
            continue
        if outcome is not None:
            what, queue = outcome
            done[what].append(job_id)
            if queue is not None:
                to_send.append((job_id, queue))
    for job_id, queue in to_send:  # after the commit that makes the state visible
        try:
            send(job_id, queue)
        except Exception:
            log.exception(
                "reconciler: sending job %s to queue %r failed; a later pass sends it again", job_id, queue
            )
            done["send_failed"].append(job_id)
    if any(done.values()):
        log.info("reconciler: %s", done)
    _expire_uploads_safely(settings, sessions, now)
    return done


def _take_back(session: Session, job_id: str, now: datetime) -> Examined:
    """A running job whose lease ran out: queued again to resume from its last checkpoint, or
    failed once it has used all its attempts."""
    job = session.get(Job, job_id)
    if job is None:
        return None
    if job.attempt >= job.max_attempts:
        error = {
            "code": "max_attempts_exceeded",
            "message": (
                f"the job's worker was lost {job.attempt} times (max_attempts={job.max_attempts}); "
                "the job is not retried again"
            ),
            "param": None,
        }
        failed = EventRecord(f"Fine-tuning job failed: {error['message']}", level="error")
        if jobstate.fail_unclaimed(session, job.id, [JobStatus.RUNNING], error, [failed]):
            return "failed", None
        return None
    checkpoint = latest_checkpoint(session, job.id)
    where = f"step {checkpoint.step_number}" if checkpoint else "the start"
    lost = EventRecord(
        f"The worker running attempt {job.attempt} was lost; the job is queued again "
        f"and resumes from {where} (attempt {job.attempt + 1} of {job.max_attempts}).",
        level="warn",
    )
    if jobstate.requeue_expired(session, job.id, now, [lost]):
        return "requeued", job.queue
    return None


def _resend(session: Session, job_id: str, now: datetime) -> Examined:
    """A waiting job untouched for a while: its message may be lost, so it is sent again."""
    job = session.get(Job, job_id)
    if job is not None and jobstate.touch(session, job.id, job.status, now):
        return "resent", job.queue
    return None


def expire_uploads(
    sessions: sessionmaker[Session], store: ObjectStore, now: datetime, batch: int = 100
) -> list[str]:
    """Uploads API: pending uploads past their hour become `expired`; the parts of every ended
    upload (expired, cancelled, completed) are removed, objects first, then rows, so a pass that
    fails half-way leaves rows for the next one to find. Returns the upload ids cleaned."""
    with session_scope(sessions) as session:
        expired = uploads.expired_pending(session, now, batch)
        for upload_id in expired:
            uploads.finish(session, upload_id, uploads.UploadStatus.EXPIRED)
    with session_scope(sessions) as session:
        ended = uploads.ended_with_parts(session, batch)
    for upload_id in ended:
        store.delete_prefix(upload_prefix(upload_id))
        with session_scope(sessions) as session:
            uploads.delete_parts(session, upload_id)
    if ended:
        log.info(
            "reconciler: removed the parts of %d ended uploads (%d expired now)", len(ended), len(expired)
        )
    return ended


def _expire_uploads_safely(settings: Settings, sessions: sessionmaker[Session], now: datetime) -> None:
    try:
        expire_uploads(sessions, store_from_settings(settings), now)
    except Exception:
        log.exception("reconciler: cleaning up expired uploads failed; the next pass retries")
