"""Celery tasks. Each task process is fresh (`worker_max_tasks_per_child=1`) and, as soon as it
starts, launches the training process of its future job so the imports are done by the time a
job arrives."""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import worker_process_init, worker_process_shutdown

from tuneforge.config import get_settings
from tuneforge.worker.celery_app import RECONCILE_TASK, RUN_JOB_TASK, celery_app
from tuneforge.worker.resilience import connect_worker_signals

log = logging.getLogger(__name__)
connect_worker_signals()  # on SIGTERM a running job checkpoints and goes back to its queue


@worker_process_init.connect
def _start_warm_training_process(**_: Any) -> None:
    from tuneforge.worker.execution import prepare_training_process

    if _consumed_queues() != {"control"}:
        prepare_training_process(get_settings())
        _import_validation_stack()


def _import_validation_stack() -> None:
    """A job's first work here is validating its files with the real tokenizer: import that stack
    while the process waits for a job, not on the job's clock. Nothing here touches CUDA."""
    from transformers import AutoTokenizer  # noqa: F401

    import tuneforge.training.data  # noqa: F401


@worker_process_shutdown.connect
def _stop_warm_training_process(**_: Any) -> None:
    from tuneforge.worker.execution import release_training_process

    release_training_process()


def _consumed_queues() -> set[str]:
    import os

    return set(filter(None, os.environ.get("TUNEFORGE_WORKER_QUEUES", "").split(",")))


@celery_app.task(name=RUN_JOB_TASK, acks_late=True, ignore_result=True)
def run_job_task(job_id: str) -> str:
    from tuneforge.worker.execution import WorkerContext, run_job

    outcome = run_job(job_id, WorkerContext.from_settings(get_settings()))
    log.info("job %s: %s", job_id, outcome)
    return outcome


@celery_app.task(name=RECONCILE_TASK, ignore_result=True)
def reconcile_task() -> dict[str, list[str]]:
    from tuneforge.db import make_engine, make_sessionmaker
    from tuneforge.worker.dispatch import enqueue_job
    from tuneforge.worker.reconciler import reconcile
    from tuneforge.worker.retention import sweep_if_due

    settings = get_settings()
    engine = make_engine(settings.database_url, pool_size=1, max_overflow=1)
    try:
        done = reconcile(settings, make_sessionmaker(engine), enqueue_job)
        sweep_if_due(settings, make_sessionmaker(engine))
        return done
    finally:
        engine.dispose()
