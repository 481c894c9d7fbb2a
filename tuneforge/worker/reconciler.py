"""The periodic reconciler (Celery beat): the database says what should be running, the broker
may have forgotten. It re-sends queued (and validating) jobs whose message was lost, and takes
back running jobs whose lease ran out (their worker died): they run again from their last stored
checkpoint, up to `max_attempts` runs, then fail with a clear error."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy.orm import Session, sessionmaker

from tuneforge.config import Settings
from tuneforge.db import session_scope, utcnow
from tuneforge.models.checkpoint import latest_checkpoint
from tuneforge.models.job import JobStatus
from tuneforge.worker import jobstate
from tuneforge.worker.jobstate import EventRecord

log = logging.getLogger(__name__)


def reconcile(
    settings: Settings, sessions: sessionmaker[Session], send: Callable[[str, str], None]
) -> dict[str, list[str]]:
    """One pass. `send(job_id, queue)` enqueues a run task. Returns the job ids acted on."""
    now = utcnow()
    done: dict[str, list[str]] = {"requeued": [], "resent": [], "failed": []}
    to_send: list[tuple[str, str]] = []
    with session_scope(sessions) as session:
        for job in jobstate.expired_running_jobs(session, now):
            checkpoint = latest_checkpoint(session, job.id)
            where = f"step {checkpoint.step_number}" if checkpoint else "the start"
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
                    done["failed"].append(job.id)
                continue
            lost = EventRecord(
                f"The worker running attempt {job.attempt} was lost; the job is queued again "
                f"and resumes from {where} (attempt {job.attempt + 1} of {job.max_attempts}).",
                level="warn",
            )
            if jobstate.requeue_expired(session, job.id, now, [lost]):
                to_send.append((job.id, job.queue))
                done["requeued"].append(job.id)
        stale_before = now - timedelta(seconds=settings.queued_stale_seconds)
        for job in jobstate.stale_waiting_jobs(session, stale_before):
            if jobstate.touch(session, job.id, job.status, now):
                to_send.append((job.id, job.queue))
                done["resent"].append(job.id)
    for job_id, queue in to_send:  # after the commit that makes the state visible
        send(job_id, queue)
    if any(done.values()):
        log.info("reconciler: %s", done)
    return done
