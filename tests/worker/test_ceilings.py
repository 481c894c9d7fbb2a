"""The worker checks the step ceiling again before it trains: a job queued (or paused, or resumed)
before the ceiling was lowered fails with `job_over_ceiling` instead of running past it, whether
`max_steps` or its epochs over the training file set its size."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import update

from tests.support import wait_for
from tuneforge.db import session_scope
from tuneforge.models.job import Job, JobStatus
from tuneforge.worker.celery_app import RUN_JOB_TASK, make_celery

from .helpers import events, get_job, seed_job
from .procs import Services


@pytest.mark.slow
def test_a_job_over_the_ceiling_fails_before_training(services: Services, qa_path: Path) -> None:
    over = seed_job(services, qa_path, max_steps=30, save_every=10)
    by_epochs = seed_job(services, qa_path, max_steps=30, save_every=10)
    with session_scope(services.sessions) as session:  # 3 epochs of 32 examples in batches of 4: 24
        job = session.get(Job, by_epochs)
        assert job is not None
        spec = dict(job.spec)
        spec["method"]["supervised"]["hyperparameters"].update(max_steps=None, n_epochs=3)
        session.execute(update(Job).where(Job.id == by_epochs).values(spec=spec))
    under = seed_job(services, qa_path, max_steps=2, save_every=2)
    celery = make_celery(services.settings())
    for job_id in (over, by_epochs, under):
        celery.send_task(RUN_JOB_TASK, args=[job_id], queue="gpu")
    services.worker(queues="gpu", concurrency=1, extra_env={"TUNEFORGE_MAX_JOB_STEPS": "20"})

    wait_for(
        lambda: (
            get_job(services, over).status == JobStatus.FAILED.value
            and get_job(services, by_epochs).status == JobStatus.FAILED.value
            and get_job(services, under).status == JobStatus.SUCCEEDED.value
        ),
        timeout=300,
        what="the jobs over the ceiling failed and the other succeeded",
        logs=services,
    )
    for job_id in (over, by_epochs):
        failed = get_job(services, job_id)
        assert failed.error is not None and failed.error["code"] == "job_over_ceiling", failed.error
        assert not [e for e in events(services, job_id) if e.type == "metrics"]  # it never trained
