"""What the worker tests that really train tuneforge/tiny-chat share (test_distributed_training.py,
test_oom.py): their settings, sending a job to a given queue, waiting for its end with the
training logs in the error, and reading its start events."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from sqlalchemy import update

from tuneforge.db import session_scope
from tuneforge.models.job import Job, JobEvent
from tuneforge.worker.celery_app import RUN_JOB_TASK, make_celery

from .helpers import get_job, status
from .procs import Services, wait_for

REAL_RUNNER = "tuneforge.training.run:run_training"
#: The settings of a module whose workers run the real recipe (leases outlast a loaded machine's stalls).
REAL_TRAINING_ENV = {"TUNEFORGE_TRAINING_RUNNER": REAL_RUNNER, "TUNEFORGE_LEASE_SECONDS": "30"}


def training_logs(services: Services) -> Callable[[], str]:
    """The module's worker logs, then the training logs of its runs still on disk (torchrun's and
    every rank's output for a multi-device run, the spare training process's for one device)."""

    def text() -> str:
        logs = sorted((services.tmp / "data" / "work" / "logs").glob("*.log"))
        return services.logs() + "".join(
            f"\n== training log {log.name}\n{log.read_text(errors='replace')[-6000:]}" for log in logs
        )

    return text


def finished(services: Services, job_id: str, timeout: float) -> Job:
    """The job once it has ended (succeeded, failed or cancelled)."""
    assert wait_for(
        lambda: status(services, job_id) in ("succeeded", "failed", "cancelled"),
        timeout,
        job_id,
        training_logs(services),
    )
    return get_job(services, job_id)


def send_to_queue(services: Services, job_id: str, queue: str) -> None:
    """Moves a queued job to `queue` and sends its run message there (a worker of that queue only)."""
    with session_scope(services.sessions) as session:
        session.execute(update(Job).where(Job.id == job_id).values(queue=queue))
    saved = dict(os.environ)
    os.environ.update(services.env)
    try:
        app = make_celery(services.settings())
    finally:
        os.environ.clear()
        os.environ.update(saved)
    app.send_task(RUN_JOB_TASK, args=[job_id], queue=queue)


def starts(rows: list[JobEvent]) -> list[dict[str, Any]]:
    """The data of the job's "Training started" events, one per run."""
    return [e.data for e in rows if e.message.startswith("Training started") and e.data]
