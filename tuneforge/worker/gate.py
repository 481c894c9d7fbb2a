"""The check a run message passes before the worker spends anything on it.

Each run message gets a fresh pool process (`worker_max_tasks_per_child=1`), and a fresh pool
process starts a spare training interpreter. A message for a job that was cancelled, paused or
finished, or that another worker runs, would cost a fork and a training interpreter for nothing:
cheap API calls (create, then cancel, many jobs) could buy a worker's time by the hour. So the
worker's consumer process asks the database first, and a message for a job that is not runnable
is acknowledged and dropped there, the way Celery drops a revoked task, never reaching the pool.

If the database cannot be asked, the message goes on to the pool, whose claim decides as before.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.worker.request import Request
from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from tuneforge.config import get_settings
from tuneforge.db import utcnow
from tuneforge.worker import jobstate

log = logging.getLogger(__name__)

_engine: Engine | None = None


def _database() -> Engine:
    """The consumer process's engine. It holds no connection between checks (NullPool), so the
    pool processes it forks inherit none."""
    global _engine
    if _engine is None:
        _engine = create_engine(get_settings().database_url, poolclass=NullPool)
    return _engine


def why_not_runnable(job_id: str) -> str | None:
    """None when a worker may start on the job; else why not (its status)."""
    with Session(_database()) as session:
        return jobstate.why_not_runnable(session, job_id, utcnow())


class RunnableRequest(Request):
    """A run task's request that is dropped, like a revoked one, when its job is not runnable."""

    _gate_checked = False

    def revoked(self) -> bool:
        if super().revoked():
            return True
        if self._gate_checked:
            return False
        self._gate_checked = True
        job_id = _job_id(self.args)
        if job_id is None:
            return False
        try:
            reason = why_not_runnable(job_id)
        except Exception:
            log.warning(
                "job %s: could not check whether it is runnable; running the task", job_id, exc_info=True
            )
            return False
        if reason is None:
            return False
        log.info("job %s: %s; message dropped before it reached a pool process", job_id, reason)
        self._announce_revoked("not runnable", False, None, False)
        return True


def _job_id(args: Any) -> str | None:
    if isinstance(args, (list, tuple)) and args and isinstance(args[0], str):
        return args[0]
    return None
