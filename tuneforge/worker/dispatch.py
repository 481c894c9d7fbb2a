"""Sending work to the workers. Called by the API after the commit that makes a job visible
(creation, resume) and by the reconciler. A message only names the job: the task reads everything
else from the database, so sending one twice is harmless.

Which queues a job may name is decided here too: only the queues the service is configured to
run (`allowed_queues`). A queue is a broker key; a name the operator did not configure would wait
forever, and some names are the broker's or the service's own (`RESERVED_QUEUES`).
"""

from __future__ import annotations

import re

from tuneforge.config import Settings, get_settings

LEGACY_DEFAULT_QUEUES = frozenset({"", "default"})

#: The reconciler's queue, Celery's default and broadcast names, and the keys kombu's Redis
#: transport keeps beside the queues (`unacked`, `unacked_index`, `unacked_mutex`, bindings).
RESERVED_QUEUES = frozenset(
    {"control", "celery", "celeryev", "unacked", "unacked_index", "unacked_mutex", "_kombu"}
)
QUEUE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class UnknownQueue(ValueError):
    """A job named a queue this service does not run."""


def is_reserved(queue: str) -> bool:
    return (
        queue in RESERVED_QUEUES
        or queue.startswith(("_kombu", "celery"))
        or queue.endswith(".pidbox")
        or QUEUE_NAME.fullmatch(queue) is None
    )


def allowed_queues(settings: Settings) -> frozenset[str]:
    """The queues a job may name: the default queue, the worker classes' queues
    (`TUNEFORGE_WORKER_CLASSES`) and `TUNEFORGE_JOB_QUEUES`; never a reserved name."""
    from tuneforge.estimates.jobs import parse_worker_classes

    names = {settings.default_queue, *parse_worker_classes(settings.worker_classes)}
    names |= {q.strip() for q in settings.job_queues.split(",") if q.strip()}
    return frozenset(q for q in names if not is_reserved(q))


def check_queue(queue: str | None, settings: Settings) -> str:
    """The broker queue for a new job's `queue` (None and "default": the default queue); raises
    UnknownQueue for any other name that is not in `allowed_queues`."""
    if queue is None or queue in LEGACY_DEFAULT_QUEUES:
        return settings.default_queue
    allowed = allowed_queues(settings)
    if queue not in allowed:
        shown = repr(queue[:64]) + ("..." if len(queue) > 64 else "")
        raise UnknownQueue(
            f"Queue {shown} is not a queue this service runs; choose one of: {', '.join(sorted(allowed))} "
            "(or leave `queue` out for the default)."
        )
    return queue


def queue_for(queue: str | None) -> str:
    """The broker queue of a job: its spec's `queue` (a GPU class), or the service's default.
    Refuses a reserved name (a job stored before names were checked), so no message can land on
    the broker's or the reconciler's own keys."""
    if queue is None or queue in LEGACY_DEFAULT_QUEUES:
        return get_settings().default_queue
    if is_reserved(queue):
        raise UnknownQueue(f"queue {queue[:64]!r} is reserved; the job cannot be sent")
    return queue


def enqueue_job(job_id: str, queue: str | None = None) -> None:
    """Sends the run task for `job_id` to its queue (validating_files jobs are validated first,
    by the same task)."""
    from tuneforge.worker.celery_app import RUN_JOB_TASK, celery_app

    celery_app.send_task(RUN_JOB_TASK, args=[job_id], queue=queue_for(queue))
