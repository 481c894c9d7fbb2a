"""GET /v1/models, /healthz, /readyz and the OpenAPI document."""

from __future__ import annotations

import openai
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.api.conftest import ProjectCtx
from tuneforge.db import session_scope
from tuneforge.models.job import Job


def test_models_lists_base_then_fine_tuned(
    project: ProjectCtx, other_project: ProjectCtx, app: FastAPI, chat_jsonl: str
) -> None:
    models = project.openai.models.list().data
    assert models[0].id == "tuneforge/tiny-chat"
    assert models[0].object == "model" and models[0].owned_by == "tuneforge"
    assert project.openai.models.retrieve("tuneforge/tiny-chat").id == "tuneforge/tiny-chat"

    job = project.openai.fine_tuning.jobs.create(
        model="tuneforge/tiny-chat", training_file=project.upload(chat_jsonl)
    )
    name = f"ft:tuneforge/tiny-chat:{project.id}::{job.id[-8:]}"
    with session_scope(app.state.sessionmaker) as session:
        row = session.get(Job, job.id)
        assert row is not None
        row.fine_tuned_model = name
        row.status = "succeeded"
    ids = [m.id for m in project.openai.models.list().data]
    assert ids[0] == "tuneforge/tiny-chat" and ids[-1] == name
    assert project.openai.models.retrieve(name).owned_by == project.id
    assert name not in [m.id for m in other_project.openai.models.list().data]
    with pytest.raises(openai.NotFoundError):
        other_project.openai.models.retrieve(name)
    with pytest.raises(openai.NotFoundError):
        project.openai.models.retrieve("no-such-model")


def test_health_ready_and_docs(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ok",
        "checks": {"database": "ok", "schema": "ok", "store": "ok", "broker": "ok"},
    }
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/v1/files",
        "/v1/files/{file_id}/content",
        "/v1/fine_tuning/jobs",
        "/v1/fine_tuning/jobs/{fine_tuning_job_id}/cancel",
        "/v1/fine_tuning/jobs/{fine_tuning_job_id}/events",
        "/v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints",
        "/v1/models",
        "/v1/admin/projects",
    ):
        assert path in paths


def test_unknown_route_answers_error_body(client: TestClient) -> None:
    response = client.get("/v1/nothing-here")
    assert response.status_code == 404
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
