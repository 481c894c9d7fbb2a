"""The Celery app. The database is the source of truth for job state, so there is no result
backend: a task message only says "look at job X"; the task claims the job with a conditional
UPDATE and a lease (tuneforge/worker/jobstate.py), which makes redelivered or duplicated
messages harmless.

Broker: `Settings.celery_broker_url` (Redis in production; a SQLite file for `make run`).
One job per worker process at a time: prefetch 1, late acks, a fresh pool process per task.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from celery import Celery
from celery.signals import celeryd_init, worker_process_shutdown

from tuneforge.config import Settings, get_settings

RUN_JOB_TASK = "tuneforge.run_job"
RECONCILE_TASK = "tuneforge.reconcile"
SEND_WEBHOOKS_TASK = "tuneforge.send_webhooks"


def make_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    app = Celery(
        "tuneforge",
        broker=settings.celery_broker_url,
        include=["tuneforge.worker.tasks", "tuneforge.worker.webhooks"],
    )
    transport_options: dict[str, Any] = {}
    if settings.embedded_broker:
        # kombu's SQLAlchemy transport hands its transport options to create_engine, so its
        # polling interval (default 1 s) can only be set on the class.
        from kombu.transport import sqlalchemy as sqla_transport

        sqla_transport.Transport.polling_interval = 0.25
    else:
        transport_options["visibility_timeout"] = settings.broker_visibility_timeout
        if settings.broker_key_prefix and settings.celery_broker_url.startswith(("redis", "sentinel")):
            transport_options["global_keyprefix"] = settings.broker_key_prefix
    app.conf.update(
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_max_tasks_per_child=1,
        worker_proc_alive_timeout=settings.worker_proc_alive_timeout,
        task_default_queue=settings.default_queue,
        task_create_missing_queues=True,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        beat_schedule={
            "reconcile-jobs": {
                "task": RECONCILE_TASK,
                "schedule": settings.reconcile_every_seconds,
                "options": {"queue": "control", "expires": settings.reconcile_every_seconds},
            },
            "send-webhooks": {
                "task": SEND_WEBHOOKS_TASK,
                "schedule": settings.webhook_send_every_seconds,
                "options": {"queue": "control", "expires": settings.webhook_send_every_seconds},
            },
        },
        task_routes={RECONCILE_TASK: {"queue": "control"}, SEND_WEBHOOKS_TASK: {"queue": "control"}},
    )
    return app


celery_app = make_celery()


def _metrics_port(settings: Settings) -> int | None:
    """A `tuneforge worker`'s metrics port, or the beat's (its worker consumes `control` only)."""
    queues = set(filter(None, os.environ.get("TUNEFORGE_WORKER_QUEUES", "").split(",")))
    if not queues:
        return None
    return settings.beat_metrics_port if queues == {"control"} else settings.worker_metrics_port


@celeryd_init.connect
def _serve_metrics(**_: Any) -> None:
    """The worker's (or beat's) /metrics, before its pool processes fork: see tuneforge/metrics.py."""
    settings = get_settings()
    port = _metrics_port(settings)
    if port is None:
        return
    # An empty directory for this worker's processes (Celery has imported the task modules, and
    # with them tuneforge.metrics, already: use_multiprocess_directory creates the metrics anew).
    from tuneforge.metrics import serve_worker_metrics, use_multiprocess_directory

    directory = settings.work_dir / "metrics" / f"worker-{os.getpid()}"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    use_multiprocess_directory(directory)
    serve_worker_metrics(settings.worker_metrics_host, port, directory)


@worker_process_shutdown.connect
def _forget_pool_process_gauges(pid: int | None = None, **_: Any) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from tuneforge.metrics import mark_process_dead

        mark_process_dead(pid or os.getpid())
