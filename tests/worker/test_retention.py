"""Checkpoints of failed and cancelled jobs are deleted, rows and objects, once they are older
than the retention period; a succeeded job's, a recent one's and an unfinished one's stay."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from tests.support import pg_database
from tuneforge.config import Settings
from tuneforge.db import make_engine, make_sessionmaker, session_scope, utcnow
from tuneforge.models.checkpoint import Checkpoint, add_checkpoint, new_checkpoint_id
from tuneforge.models.job import Job, JobStatus, new_job_id
from tuneforge.models.project import ensure_default_project
from tuneforge.storage import ObjectStore
from tuneforge.storage.filesystem import FilesystemStore
from tuneforge.storage.keys import CheckpointKeys, artifact_key, job_checkpoints_prefix
from tuneforge.worker import retention
from tuneforge.worker.retention import sweep_expired_checkpoints, sweep_if_due


@pytest.fixture
def pg_url() -> Iterator[str]:
    with pg_database("tf_retention") as url:
        yield url


@pytest.fixture
def sessions(pg_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(pg_url)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture(params=["filesystem", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "filesystem":
        return FilesystemStore(tmp_path / "objects")
    from tuneforge.storage.s3 import S3Store

    endpoint = request.getfixturevalue("s3_endpoint")
    return S3Store(f"tf-{uuid.uuid4().hex[:12]}", prefix="objects", endpoint_url=endpoint, create_bucket=True)


def _job(
    sessions: sessionmaker[Session], store: ObjectStore, status: JobStatus, ended_days_ago: float | None
) -> str:
    """A job with two checkpoints (adapter and state objects each) and an adapter artifact."""
    now = utcnow()
    job_id = new_job_id()
    with session_scope(sessions) as session:
        project = ensure_default_project(session)
        session.add(
            Job(
                id=job_id,
                project_id=project.id,
                model="tuneforge/tiny-chat",
                status=status.value,
                spec={},
                training_file="file-x",
                seed=1,
                queue="gpu",
                created_at=now - timedelta(days=60),
                updated_at=now,
                finished_at=None if ended_days_ago is None else now - timedelta(days=ended_days_ago),
            )
        )
        session.flush()
        for step in (2, 4):
            keys = CheckpointKeys(job_id, new_checkpoint_id())
            store.put_bytes(keys.adapter, b"adapter")
            store.put_bytes(keys.state, b"state")
            add_checkpoint(
                session, job_id, step_number=step, storage_key=keys.adapter, checkpoint_id=keys.checkpoint_id
            )
    store.put_bytes(artifact_key(job_id, "adapter"), b"final adapter")
    return job_id


def _rows(sessions: sessionmaker[Session], job_id: str) -> int:
    with session_scope(sessions) as session:
        return len(list(session.scalars(select(Checkpoint.id).where(Checkpoint.job_id == job_id))))


def _objects(store: ObjectStore, job_id: str) -> int:
    return len(list(store.list(job_checkpoints_prefix(job_id))))


def test_expired_checkpoints_of_failed_and_cancelled_jobs_are_deleted(
    sessions: sessionmaker[Session], store: ObjectStore, tmp_path: Path
) -> None:
    settings = Settings(data_dir=tmp_path, checkpoint_retention_days=30)
    failed_old = _job(sessions, store, JobStatus.FAILED, ended_days_ago=31)
    cancelled_old = _job(sessions, store, JobStatus.CANCELLED, ended_days_ago=45)
    failed_recent = _job(sessions, store, JobStatus.FAILED, ended_days_ago=29)
    succeeded_old = _job(sessions, store, JobStatus.SUCCEEDED, ended_days_ago=90)
    paused = _job(sessions, store, JobStatus.PAUSED, ended_days_ago=None)
    # An object a crash left without a row goes with its job's checkpoints.
    store.put_bytes(CheckpointKeys(failed_old, "ftckpt-orphan").state, b"state")

    swept = sweep_expired_checkpoints(settings, sessions, store)

    assert sorted(swept) == sorted([failed_old, cancelled_old])
    for job_id in (failed_old, cancelled_old):
        assert _rows(sessions, job_id) == 0
        assert _objects(store, job_id) == 0
        assert store.get_bytes(artifact_key(job_id, "adapter")) == b"final adapter"  # artifacts stay
    for job_id in (failed_recent, succeeded_old, paused):
        assert _rows(sessions, job_id) == 2
        assert _objects(store, job_id) == 4
    assert sweep_expired_checkpoints(settings, sessions, store) == []


def test_zero_retention_keeps_everything(sessions: sessionmaker[Session], tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path / "objects")
    job_id = _job(sessions, store, JobStatus.FAILED, ended_days_ago=400)
    assert (
        sweep_expired_checkpoints(Settings(data_dir=tmp_path, checkpoint_retention_days=0), sessions, store)
        == []
    )
    assert _rows(sessions, job_id) == 2 and _objects(store, job_id) == 4


def test_the_reconciler_hook_sweeps_once_per_interval(
    sessions: sessionmaker[Session], pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(
        data_dir=tmp_path,
        database_url=pg_url,
        storage_url=f"file://{tmp_path / 'objects'}",
        checkpoint_retention_days=1,
    )
    store = FilesystemStore(tmp_path / "objects")
    monkeypatch.setattr(retention, "_last_sweep", None)
    first = _job(sessions, store, JobStatus.FAILED, ended_days_ago=2)
    assert first in sweep_if_due(settings, sessions)
    assert _rows(sessions, first) == 0 and _objects(store, first) == 0
    second = _job(sessions, store, JobStatus.FAILED, ended_days_ago=2)
    assert sweep_if_due(settings, sessions) == []  # not due yet: the next pass is an interval later
    assert _rows(sessions, second) == 2
    monkeypatch.setattr(retention, "_last_sweep", retention._last_sweep - retention.SWEEP_EVERY_SECONDS)
    assert second in sweep_if_due(settings, sessions)
