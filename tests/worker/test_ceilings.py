"""The worker checks the step ceiling again before it trains: a job queued (or paused, or resumed)
before the ceiling was lowered fails with `job_over_ceiling` instead of running past it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import wait_for
from tuneforge.models.job import JobStatus
from tuneforge.worker.celery_app import RUN_JOB_TASK, make_celery

from .helpers import events, get_job, seed_job
from .procs import Services


@pytest.mark.slow
def test_a_job_over_the_ceiling_fails_before_training(services: Services, qa_path: Path) -> None:
    over = seed_job(services, qa_path, max_steps=30, save_every=10)
    under = seed_job(services, qa_path, max_steps=2, save_every=2)
    celery = make_celery(services.settings())
    for job_id in (over, under):
        celery.send_task(RUN_JOB_TASK, args=[job_id], queue="gpu")
    services.worker(queues="gpu", concurrency=1, extra_env={"TUNEFORGE_MAX_JOB_STEPS": "20"})

    wait_for(
        lambda: (
            get_job(services, over).status == JobStatus.FAILED.value
            and get_job(services, under).status == JobStatus.SUCCEEDED.value
        ),
        timeout=300,
        what="the job over the ceiling failed and the other succeeded",
        logs=services,
    )
    job = get_job(services, over)
    assert job.error is not None and job.error["code"] == "job_over_ceiling", job.error
    assert not [e for e in events(services, over) if e.type == "metrics"]  # it never trained
