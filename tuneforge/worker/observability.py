"""What one run of a job records in the worker's Prometheus metrics (tuneforge/metrics.py):
steps and tokens trained, its tokens/s while it runs, the time from the job's creation to its
first trained step (first runs only), lease renewals, and the run's duration by outcome.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from tuneforge import metrics
from tuneforge.db import session_scope, utcnow
from tuneforge.models.job import Job
from tuneforge.worker.jobstate import RunPlan

log = logging.getLogger(__name__)


class RunMetrics:
    def __init__(self, sessions: sessionmaker[Session], plan: RunPlan) -> None:
        self.sessions = sessions
        self.job_id = plan.job_id
        self.queue = plan.queue or "default"
        # A job's first step happens in a run that starts from step 0 and resumes nothing.
        self.first_run = plan.resume is None and plan.logged_step == 0
        self.started = time.monotonic()
        self.last_step: int | None = None
        self.last_tokens = 0

    def step(self, message: dict[str, Any]) -> None:
        """A metrics message of the training process (one per logged step)."""
        step = int(message["step"])
        tokens = int(message.get("tokens_seen") or 0)
        if self.last_step is None and self.first_run:
            self._first_step()
        new_steps = step - self.last_step if self.last_step is not None else 1
        new_tokens = tokens - self.last_tokens if self.last_step is not None else tokens
        self.last_step, self.last_tokens = step, tokens
        metrics.record_training_step(
            self.queue, max(new_steps, 0), max(new_tokens, 0), message.get("tokens_per_second")
        )

    def _first_step(self) -> None:
        try:
            with session_scope(self.sessions) as session:
                job = session.get(Job, self.job_id)
                created_at = job.created_at if job is not None else None
        except Exception:  # an unreachable database costs this one observation, nothing else
            log.debug("job %s: creation time unavailable for metrics", self.job_id, exc_info=True)
            return
        if created_at is not None:
            metrics.record_first_step((utcnow() - created_at).total_seconds())

    def renewed(self, ok: bool) -> None:
        metrics.record_lease_renewal(ok)

    def finished(self, outcome: str) -> None:
        metrics.record_run_finished(self.queue, outcome, time.monotonic() - self.started)
