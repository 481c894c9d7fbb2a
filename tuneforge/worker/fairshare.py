"""Fair share between projects: which waiting job a worker runs next.

A run-task message is a claim token for its queue, not an order to run one particular job: the
worker that takes it claims the fairest runnable job of that queue: a job of the project with the
fewest running jobs; among projects with as many, the one that has waited longest since it last
started a job (one that never started any first); within the project, the oldest job. So one
project's fifty queued jobs do not make another project's single job wait behind all of them: it
runs as soon as a worker is free, even with one worker that runs one job at a time (there every
project has nothing running when a pick is made, and the projects take turns).

Every waiting job has at least one message in its queue (sent when it was created or resumed, and
again by the reconciler when a job waits too long), and each message runs at most one job, so
every job is still run, and run once: the claim is the same conditional UPDATE as before
(`jobstate.claim_run`), and a message that finds nothing left to claim (a duplicate, a re-send,
a late redelivery) ends at once without starting anything.

The pick is one query on the jobs table, built on the database's own locking: on PostgreSQL
`SELECT ... FOR UPDATE SKIP LOCKED` in the claiming transaction, so two workers picking at once
take different jobs; on SQLite (one machine, writes serialised) the claim's conditional UPDATE
decides, and a worker that loses picks again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import TypeVar

from sqlalchemy import Select, and_, func, or_, select
from sqlalchemy.orm import Session, aliased, sessionmaker

from tuneforge.db import session_scope, utcnow
from tuneforge.models.job import Job, JobStatus
from tuneforge.worker.dispatch import LEGACY_DEFAULT_QUEUES, queue_for

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Picks a worker tries when other workers keep winning the claim (SQLite) before giving the
#: message up; the job it lost is running elsewhere, and its own job still has a message.
MAX_PICKS = 8


def queue_names(queue: str | None) -> list[str]:
    """Job `queue` values whose messages go to the same broker queue as `queue` (jobs created
    before the default queue had a name carry "" or "default")."""
    broker_queue = queue_for(queue)
    names = {broker_queue}
    if broker_queue == queue_for(None):
        names |= LEGACY_DEFAULT_QUEUES
    return sorted(names)


def fairest_job_query(queue: str | None, now: datetime) -> Select[str]:
    """The id of the job to run next from `queue`: runnable (queued, or running with a lease that
    ran out, as `claim_job` allows), ordered by how many jobs its project has running (live
    leases, any queue), then by when the project last started a job (never first), then by age."""
    running = aliased(Job)
    started = aliased(Job)
    project_running = (
        select(func.count())
        .select_from(running)
        .where(
            running.project_id == Job.project_id,
            running.status == JobStatus.RUNNING.value,
            running.lease_expires_at >= now,
        )
        .scalar_subquery()
    )
    project_last_start = (
        select(func.max(started.started_at)).where(started.project_id == Job.project_id).scalar_subquery()
    )
    return (
        select(Job.id)
        .where(
            Job.queue.in_(queue_names(queue)),
            or_(
                Job.status == JobStatus.QUEUED.value,
                and_(Job.status == JobStatus.RUNNING.value, Job.lease_expires_at < now),
            ),
        )
        .order_by(project_running, project_last_start.asc().nulls_first(), Job.created_at, Job.id)
        .limit(1)
    )


def pick_job(session: Session, queue: str | None) -> str | None:
    """The fairest runnable job of `queue`, locked for this transaction on PostgreSQL (skipping
    jobs other workers are claiming); None when nothing waits."""
    stmt = fairest_job_query(queue, utcnow())
    if session.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update(of=Job, skip_locked=True)
    return session.scalar(stmt)


def claim_fairest(
    sessions: sessionmaker[Session], queue: str | None, claim: Callable[[Session, str], T | None]
) -> T | None:
    """Picks the fairest job of `queue` and claims it with `claim(session, job_id)` in the same
    transaction. None when there is nothing to claim: the message was a duplicate."""
    for _ in range(MAX_PICKS):
        with session_scope(sessions) as session:
            job_id = pick_job(session, queue)
            if job_id is None:
                return None
            claimed = claim(session, job_id)
            if claimed is not None:
                return claimed
        log.info("job %s was claimed by another worker first; picking again", job_id)
    return None
