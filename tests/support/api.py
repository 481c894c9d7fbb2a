"""Driving a Tuneforge app as a client: projects and keys through the admin routes, the official
`openai` SDK on a TestClient, and the one shortcut the API tests take (marking a job validated)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.testclient import TestClient
from openai import OpenAI

from .server import Server

ADMIN_KEY = "tf-admin-test-key-0123456789"


def sdk(client: TestClient, key: str) -> OpenAI:
    return OpenAI(base_url="http://testserver/v1", api_key=key, http_client=client, max_retries=0)


@dataclass
class ProjectCtx:
    id: str
    key: str
    client: TestClient
    openai: OpenAI

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def upload(self, content: bytes | str, filename: str = "train.jsonl") -> str:
        data = content.encode() if isinstance(content, str) else content
        return self.openai.files.create(file=(filename, data), purpose="fine-tune").id


def new_project(client: TestClient, name: str = "test", admin_key: str = ADMIN_KEY) -> ProjectCtx:
    admin = {"Authorization": f"Bearer {admin_key}"}
    project = client.post("/v1/admin/projects", json={"name": name}, headers=admin)
    assert project.status_code == 200, project.text
    key = client.post(f"/v1/admin/projects/{project.json()['id']}/api_keys", headers=admin)
    assert key.status_code == 200, key.text
    value = key.json()["value"]
    return ProjectCtx(project.json()["id"], value, client, sdk(client, value))


def admin_request(server: Server, method: str, path: str, key: str, **kwargs: Any) -> Any:
    response = httpx.request(
        method, server.base_url + path, headers={"Authorization": f"Bearer {key}"}, timeout=30, **kwargs
    )
    assert response.status_code == 200, response.text
    return response.json()


def mark_validated(app: FastAPI, job_id: str) -> None:
    """validating_files -> queued, as a worker's file validation would (used where no worker runs)."""
    from tuneforge.db import session_scope
    from tuneforge.models.job import JobStatus, transition

    with session_scope(app.state.sessionmaker) as session:
        assert transition(session, job_id, JobStatus.QUEUED, sources=[JobStatus.VALIDATING_FILES])
