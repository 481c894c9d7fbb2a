"""Sending work to the workers. Called by the API after the commit that makes a job visible
(creation, resume) and by the reconciler. A message only names the job: the task reads everything
else from the database, so sending one twice is harmless."""

from __future__ import annotations

from tuneforge.config import get_settings

LEGACY_DEFAULT_QUEUES = frozenset({"", "default"})


def queue_for(queue: str | None) -> str:
    """The broker queue of a job: its spec's `queue` (a GPU class), or the service's default."""
    if queue is None or queue in LEGACY_DEFAULT_QUEUES:
        return get_settings().default_queue
    return queue


def enqueue_job(job_id: str, queue: str | None = None) -> None:
    """Sends the run task for `job_id` to its queue (validating_files jobs are validated first,
    by the same task)."""
    from tuneforge.worker.celery_app import RUN_JOB_TASK, celery_app

    celery_app.send_task(RUN_JOB_TASK, args=[job_id], queue=queue_for(queue))
