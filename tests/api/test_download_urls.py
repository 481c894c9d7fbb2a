"""`?redirect=true` downloads on S3: the URL a tenant gets names the public endpoint, expires as
configured and never shows the internal endpoint; with only a private endpoint configured the API
streams the bytes itself."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.support.api import ProjectCtx, new_project
from tuneforge.api.app import create_app
from tuneforge.config import Settings
from tuneforge.db import migrate, session_scope, utcnow
from tuneforge.models.checkpoint import add_checkpoint, new_checkpoint_id, put_artifact
from tuneforge.models.job import Job, JobStatus, new_job_id
from tuneforge.storage.keys import CheckpointKeys, artifact_key
from tuneforge.storage.s3 import S3Store

ADMIN = "tf-admin-" + uuid.uuid4().hex
PAYLOAD = b"\x1f\x8b adapter bytes"


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    name = f"tf-{uuid.uuid4().hex[:12]}"
    S3Store(name, endpoint_url=s3_endpoint, create_bucket=True)
    return name


@contextmanager
def _client(tmp_path: Path, bucket: str, s3_endpoint: str, public: str | None) -> Iterator[TestClient]:
    url = f"sqlite:///{tmp_path / 'tuneforge.db'}"
    migrate(url)
    settings = Settings(
        data_dir=tmp_path,
        database_url=url,
        storage_url=f"s3://{bucket}/objects",
        s3_endpoint_url=s3_endpoint,
        s3_public_endpoint_url=public,
        s3_presign_expires_seconds=120,
        admin_key=ADMIN,
    )
    with TestClient(create_app(settings)) as client:
        yield client


def _job_with_adapter(client: TestClient, project: ProjectCtx) -> tuple[str, str]:
    """A succeeded job with an adapter artifact and one checkpoint, written as a worker would."""
    app: FastAPI = client.app  # type: ignore[assignment]
    job_id = new_job_id()
    checkpoint = CheckpointKeys(job_id, new_checkpoint_id())
    app.state.store.put_bytes(artifact_key(job_id, "adapter"), PAYLOAD)
    app.state.store.put_bytes(checkpoint.adapter, PAYLOAD)
    now = utcnow()
    with session_scope(app.state.sessionmaker) as session:
        session.add(
            Job(
                id=job_id,
                project_id=project.id,
                model="tuneforge/tiny-chat",
                status=JobStatus.SUCCEEDED.value,
                spec={},
                training_file="file-x",
                seed=1,
                queue="gpu",
                created_at=now,
                updated_at=now,
                finished_at=now,
            )
        )
        session.flush()
        put_artifact(
            session,
            job_id,
            name="adapter",
            storage_key=artifact_key(job_id, "adapter"),
            size=len(PAYLOAD),
            sha256="0" * 64,
            content_type="application/gzip",
        )
        add_checkpoint(
            session,
            job_id,
            step_number=2,
            storage_key=checkpoint.adapter,
            checkpoint_id=checkpoint.checkpoint_id,
        )
    return job_id, checkpoint.checkpoint_id


def test_redirect_names_the_public_endpoint(tmp_path: Path, bucket: str, s3_endpoint: str) -> None:
    public = f"http://localhost:{urlparse(s3_endpoint).port}"  # the same server, as clients name it
    with _client(tmp_path, bucket, s3_endpoint, public) as client:
        project = new_project(client, admin_key=ADMIN)
        job_id, checkpoint_id = _job_with_adapter(client, project)
        for path in (
            f"/v1/fine_tuning/jobs/{job_id}/artifacts/adapter",
            f"/v1/fine_tuning/jobs/{job_id}/checkpoints/{checkpoint_id}/artifacts/adapter",
        ):
            answer = client.get(
                path, params={"redirect": "true"}, headers=project.headers, follow_redirects=False
            )
            assert answer.status_code == 307
            location = answer.headers["location"]
            assert location.startswith(f"{public}/{bucket}/objects/jobs/{job_id}/")
            assert urlparse(s3_endpoint).hostname not in location
            assert parse_qs(urlparse(location).query)["X-Amz-Expires"] == ["120"]
            assert httpx.get(location).content == PAYLOAD


def test_private_endpoint_only_streams(tmp_path: Path, bucket: str, s3_endpoint: str) -> None:
    with _client(tmp_path, bucket, s3_endpoint, None) as client:
        project = new_project(client, admin_key=ADMIN)
        job_id, checkpoint_id = _job_with_adapter(client, project)
        for path in (
            f"/v1/fine_tuning/jobs/{job_id}/artifacts/adapter",
            f"/v1/fine_tuning/jobs/{job_id}/checkpoints/{checkpoint_id}/artifacts/adapter",
        ):
            answer = client.get(
                path, params={"redirect": "true"}, headers=project.headers, follow_redirects=False
            )
            assert answer.status_code == 200
            assert answer.content == PAYLOAD
            assert urlparse(s3_endpoint).netloc not in str(answer.headers)
