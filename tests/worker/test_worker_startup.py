"""A worker comes up and takes jobs however slow its imports are: Celery kills a pool process
that has not reported up within `worker_proc_alive_timeout`, so nothing slow may run before that
report. Imports are slowed for real by a `sitecustomize` on PYTHONPATH that sleeps when a worker
process (one that has imported Celery: the main process or a pool process, not a training
process) first imports `transformers`. The worker imports that stack in its main process before
it forks (tuneforge/worker/tasks.py), so the sleep lands there, before any pool process exists;
a pool process that imported it before reporting up would be killed. Two jobs in turn: each pool
process runs one job, and the replacement of the first is the one Celery times."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuneforge.models.job import JobStatus
from tuneforge.worker.celery_app import RUN_JOB_TASK, make_celery

from .helpers import events, get_job, seed_job, status
from .procs import REPO, Services, wait_for

pytestmark = pytest.mark.slow

# The worker here gets a short `worker_proc_alive_timeout`, so that the test shows the warm-up is
# off the path to the up report rather than merely shorter than our default timeout; the slowed
# import takes well over it. Measured: a pool process reports up about 1 s after it starts on a
# busy 2-core machine.
ALIVE_TIMEOUT_SECONDS = 8
SLOW_IMPORT_SECONDS = 15

SITECUSTOMIZE = '''
import os
import sys
import time

class _SlowImport:
    """Sleeps once when a worker process (Celery imported) first imports transformers."""

    def find_spec(self, name, path=None, target=None):
        if name == "transformers" and "celery" in sys.modules:
            sys.meta_path.remove(self)
            print(f"slow import: {name} in pid {os.getpid()}", file=sys.stderr, flush=True)
            time.sleep(float(os.environ["SLOW_IMPORT_SECONDS"]))
        return None


sys.meta_path.insert(0, _SlowImport())
'''


def test_slow_imports_in_pool_processes_do_not_stop_a_worker(
    services: Services, tmp_path: Path, qa_path: Path, tiny_chat_path: Path
) -> None:
    shim = tmp_path / "slow-imports"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(SITECUSTOMIZE)
    jobs = [
        seed_job(services, qa_path, status=JobStatus.VALIDATING_FILES, max_steps=3, save_every=3)
        for _ in range(2)
    ]
    worker = services.worker(
        name="slow-worker",
        extra_env={
            "PYTHONPATH": f"{shim}:{REPO}",
            "SLOW_IMPORT_SECONDS": str(SLOW_IMPORT_SECONDS),
            "TUNEFORGE_WORKER_PROC_ALIVE_TIMEOUT": str(ALIVE_TIMEOUT_SECONDS),
        },
    )
    try:
        app = make_celery(services.settings())
        for job_id in jobs:
            app.send_task(RUN_JOB_TASK, args=[job_id], queue="gpu")
        finals = [
            wait_for(lambda j=job_id: _finished(services, j), 240, f"job {job_id}", services)
            for job_id in jobs
        ]
    finally:
        services.stop(worker)
    log = "\n".join(p.read_text(errors="replace") for p in services.tmp.glob("slow-worker-*.log"))
    assert "slow import: transformers" in log, log[-3000:]  # the shim did slow the worker
    assert "before forking" in log, log[-3000:]  # in its main process
    assert "Timed out waiting for UP message" not in log, log[-3000:]
    assert finals == ["succeeded", "succeeded"], ([get_job(services, j).error for j in jobs], log[-3000:])
    for job_id in jobs:
        texts = [e.message for e in events(services, job_id)]
        assert texts[0].startswith("Files validated"), texts


def _finished(services: Services, job_id: str) -> str | None:
    value = status(services, job_id)
    return value if value in ("succeeded", "failed", "cancelled") else None
