"""Jobs written straight into the database (the API's own tests cover the HTTP path)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select

from tuneforge.db import session_scope, utcnow
from tuneforge.models.checkpoint import Artifact, Checkpoint
from tuneforge.models.file import PURPOSE_FINE_TUNE, add_file, new_file_id
from tuneforge.models.job import Job, JobEvent, JobStatus, new_job_id
from tuneforge.models.project import ensure_default_project
from tuneforge.models.spec import JobSpec
from tuneforge.storage import open_store
from tuneforge.storage.keys import file_key
from tuneforge.worker.celery_app import RUN_JOB_TASK, make_celery

from .procs import Services


def seed_job(
    services: Services,
    data: Path,
    *,
    status: JobStatus = JobStatus.QUEUED,
    max_steps: int = 8,
    save_every: int = 2,
    model: str = "tuneforge/tiny-chat",
    method: str = "supervised",
    extra: dict[str, Any] | None = None,
) -> str:
    settings = services.settings()
    store = open_store(settings.storage_url)
    file_id = new_file_id()
    store.put_file(file_key(file_id), data)
    hp = {"max_steps": max_steps, "save_every_steps": save_every, "batch_size": 4, "max_seq_length": 256}
    body: dict[str, Any] = {
        "model": model,
        "training_file": file_id,
        "suffix": "test",
        "seed": 7,
        "method": {"type": method, method: {"hyperparameters": hp}},
        **(extra or {}),
    }
    body["method"][method]["hyperparameters"] = {**hp, **body["method"][method]["hyperparameters"]}
    spec = JobSpec.model_validate(body)
    with session_scope(services.sessions) as session:
        project = ensure_default_project(session)
        add_file(
            session,
            file_id=file_id,
            project_id=project.id,
            filename=data.name,
            purpose=PURPOSE_FINE_TUNE,
            size=data.stat().st_size,
            storage_key=file_key(file_id),
            format="chat",
            examples=len(data.read_text().splitlines()),
        )
        now = utcnow()
        job = Job(
            id=new_job_id(),
            project_id=project.id,
            model=spec.model,
            status=status.value,
            spec=spec.model_dump(mode="json"),
            training_file=file_id,
            suffix=spec.suffix,
            seed=7,
            queue="gpu",
            created_at=now,
            updated_at=now,
            attempt=0,
            max_attempts=settings.max_attempts,
            last_event_seq=0,
        )
        session.add(job)
        return job.id


def get_job(services: Services, job_id: str) -> Job:
    with session_scope(services.sessions) as session:
        job = session.get(Job, job_id)
        assert job is not None
        session.expunge(job)
        return job


def events(services: Services, job_id: str) -> list[JobEvent]:
    with session_scope(services.sessions) as session:
        rows = list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)))
        session.expunge_all()
        return rows


def metric_steps(services: Services, job_id: str) -> list[int]:
    return [int(e.data["step"]) for e in events(services, job_id) if e.type == "metrics" and e.data]


def checkpoints(services: Services, job_id: str) -> list[Checkpoint]:
    with session_scope(services.sessions) as session:
        rows = list(
            session.scalars(
                select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step_number)
            )
        )
        session.expunge_all()
        return rows


def artifacts(services: Services, job_id: str) -> dict[str, Artifact]:
    with session_scope(services.sessions) as session:
        rows = list(session.scalars(select(Artifact).where(Artifact.job_id == job_id)))
        session.expunge_all()
        return {row.name: row for row in rows}


def status(services: Services, job_id: str) -> str:
    return get_job(services, job_id).status


def sender(services: Services) -> Callable[[str], object]:
    """Sends a job's run message to the "gpu" queue of the module's broker."""
    saved = dict(os.environ)
    os.environ.update(services.env)
    try:
        app = make_celery(services.settings())
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return lambda job_id: app.send_task(RUN_JOB_TASK, args=[job_id], queue="gpu")
