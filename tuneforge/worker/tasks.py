"""Celery tasks. Each task process is fresh (`worker_max_tasks_per_child=1`) and, once it exists,
launches the training process of its future job, so its imports are done by the time a job
arrives. The tokenizer stack that validates a job's files is imported once, by the worker's main
process before it forks its pool processes: each pool process (one per job) starts with it.

That warm-up runs in a background thread: Celery kills a pool process that has not reported up
within `worker_proc_alive_timeout`, and on a busy machine the imports alone can take longer than
that. A pool process reports up at once; a job that arrives during the warm-up waits for the
rest of it (never longer than the old in-line warm-up took): it needs the spare training process,
and importing the tokenizer stack from two threads at once is not safe (transformers' lazy
modules fail with a partial-import ImportError).
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from typing import Any

from celery.signals import (
    celeryd_after_setup,
    worker_process_init,
    worker_process_shutdown,
    worker_shutdown,
)

from tuneforge.config import Settings, get_settings
from tuneforge.worker.celery_app import RECONCILE_TASK, RUN_JOB_TASK, celery_app
from tuneforge.worker.resilience import connect_worker_signals

log = logging.getLogger(__name__)
connect_worker_signals()  # on SIGTERM a running job checkpoints and goes back to its queue

# How long a job waits for the warm-up before it goes on without it (starting its own training
# process and importing what it needs itself).
WARM_UP_WAIT_SECONDS = 300.0


class WarmUp:
    """The work a pool process does ahead of its job, off the thread that reports it up."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._spare_started = threading.Event()
        self._done = threading.Event()

    def start(self, settings: Settings) -> None:
        self._thread = threading.Thread(
            target=self._run, args=(settings,), name="tuneforge-warm-up", daemon=True
        )
        self._thread.start()

    def _run(self, settings: Settings) -> None:
        started = time.monotonic()
        try:
            from tuneforge.worker.execution import prepare_training_process

            prepare_training_process(settings)
        except Exception:  # the job then starts its own training process
            log.exception("could not start a spare training process")
        finally:
            self._spare_started.set()
        try:
            _import_validation_stack()
        except Exception:  # the job imports it itself and reports what fails
            log.exception("could not import the validation stack ahead of a job")
        finally:
            self._done.set()
        log.info("warm-up done in %.1f s", time.monotonic() - started)

    def wait_for_spare(self, timeout: float) -> None:
        """Blocks until the spare training process has been started (or its start failed)."""
        if self._thread is not None:
            self._spare_started.wait(timeout)

    def wait(self, timeout: float = WARM_UP_WAIT_SECONDS) -> None:
        """Blocks until the warm-up is over (at once when there is none)."""
        if self._thread is not None and not self._done.wait(timeout):
            log.warning("warm-up not done after %.0f s; the job goes on without it", timeout)


warm_up = WarmUp()


@celeryd_after_setup.connect
def _preload_validation_stack(**_: Any) -> None:
    """In the worker's main process, its logging set up and its pool processes not yet forked
    (Celery's `celeryd_after_setup`, sent as the worker starts): the tokenizer stack, which
    every pool process would otherwise import again (about 3 CPU-seconds, once per job). Importing
    it starts no thread that matters to a fork, runs no OpenMP region and touches no GPU; the
    training processes are fresh interpreters or forks of the fork server started here first."""
    if _is_control_worker():
        return
    _start_fork_server()
    started = time.monotonic()
    try:
        _import_validation_stack()
        import tuneforge.worker.execution  # what a job runs
        import tuneforge.worker.validation  # noqa: F401
    except Exception:  # each pool process's warm-up tries again, a job reports what fails
        log.exception("could not import the validation stack before forking pool processes")
        return
    log.info("validation stack imported in %.1f s, before forking", time.monotonic() - started)


_fork_server: subprocess.Popen[bytes] | None = None


def _start_fork_server() -> None:
    """The process the training processes are forked from (tuneforge/worker/forkserver.py), started
    before the pool processes fork so that they find its address in their environment."""
    global _fork_server
    if not get_settings().worker_fork_server:
        return
    from tuneforge.worker import forkserver

    _fork_server = forkserver.start()


@worker_shutdown.connect
def _stop_fork_server(**_: Any) -> None:
    from tuneforge.worker import forkserver

    forkserver.stop(_fork_server)


@worker_process_init.connect
def _start_warm_up(**_: Any) -> None:
    if not _is_control_worker():
        _log_time_to_up()
        warm_up.start(get_settings())


def _log_time_to_up() -> None:
    """How long this pool process took from fork to here (it reports up right after): the
    measurement behind `worker_proc_alive_timeout`."""
    try:
        import psutil

        since_fork = time.time() - psutil.Process().create_time()
    except Exception:
        return
    log.info("pool process ready to report up %.2f s after it started", since_fork)


def _import_validation_stack() -> None:
    """A job's first work here is validating its files with the real tokenizer: import that stack
    while the process waits for a job, not on the job's clock (in a pool process forked after
    `_preload_validation_stack`, it is imported already). Nothing here touches CUDA."""
    from transformers import AutoTokenizer  # noqa: F401

    import tuneforge.training.data  # noqa: F401


@worker_process_shutdown.connect
def _stop_warm_training_process(**_: Any) -> None:
    from tuneforge.worker.execution import release_training_process

    warm_up.wait_for_spare(timeout=10)  # a spare being started now is released too
    release_training_process()


def _consumed_queues() -> set[str]:
    import os

    return set(filter(None, os.environ.get("TUNEFORGE_WORKER_QUEUES", "").split(",")))


def _is_control_worker() -> bool:
    """A worker on the control queue only: it runs no training, so it warms nothing up."""
    return _consumed_queues() == {"control"}


# A message for a job that is not runnable is dropped before it reaches a pool process.
@celery_app.task(
    name=RUN_JOB_TASK, acks_late=True, ignore_result=True, Request="tuneforge.worker.gate:RunnableRequest"
)
def run_job_task(job_id: str) -> str:
    from tuneforge.worker.execution import WorkerContext, run_job

    warm_up.wait()
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
