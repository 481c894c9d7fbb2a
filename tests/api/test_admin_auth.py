"""Projects, API keys and what each key may see."""

from __future__ import annotations

import stat

import openai
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.api.conftest import ADMIN_KEY, ProjectCtx, new_project, sdk
from tuneforge.api.auth import resolve_admin_key
from tuneforge.config import Settings
from tuneforge.models.project import ApiKey

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def test_keys_are_shown_once_and_stored_hashed(client: TestClient, app: FastAPI) -> None:
    project = client.post("/v1/admin/projects", json={"name": "acme"}, headers=ADMIN).json()
    assert project["name"] == "acme" and project["id"].startswith("proj-")
    created = client.post(f"/v1/admin/projects/{project['id']}/api_keys", headers=ADMIN).json()
    assert created["value"].startswith("tf-")
    listed = client.get(f"/v1/admin/projects/{project['id']}/api_keys", headers=ADMIN).json()
    assert [k["id"] for k in listed["data"]] == [created["id"]]
    assert "value" not in listed["data"][0]
    assert created["value"] not in str(listed)
    with app.state.sessionmaker() as session:
        row = session.get(ApiKey, created["id"])
        assert row is not None and created["value"] not in (row.key_hash, row.prefix)
        assert len(row.key_hash) == 64
    projects = client.get("/v1/admin/projects", headers=ADMIN).json()["data"]
    assert {"default", project["id"]} <= {p["id"] for p in projects}


def test_revoked_key_is_refused(client: TestClient) -> None:
    ctx = new_project(client)
    assert ctx.openai.files.list().data == []
    key_id = client.get(f"/v1/admin/projects/{ctx.id}/api_keys", headers=ADMIN).json()["data"][0]["id"]
    revoked = client.delete(f"/v1/admin/projects/{ctx.id}/api_keys/{key_id}", headers=ADMIN).json()
    assert revoked["revoked_at"] is not None and revoked["deleted"] is True
    with pytest.raises(openai.AuthenticationError):
        ctx.openai.files.list()


def test_admin_endpoints_need_the_admin_key(project: ProjectCtx, client: TestClient) -> None:
    response = client.get("/v1/admin/projects", headers=project.headers)
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "admin_key_required"
    assert client.get("/v1/admin/projects").status_code == 401
    assert client.post("/v1/admin/projects", json={}, headers=ADMIN).status_code == 400
    assert client.post("/v1/admin/projects/proj-nope/api_keys", headers=ADMIN).status_code == 404
    assert (
        client.delete(f"/v1/admin/projects/{project.id}/api_keys/key-nope", headers=ADMIN).status_code == 404
    )


def test_admin_key_acts_as_the_default_project(client: TestClient, chat_jsonl: str) -> None:
    admin = sdk(client, ADMIN_KEY)
    file_id = admin.files.create(file=("qa.jsonl", chat_jsonl.encode()), purpose="fine-tune").id
    job = admin.fine_tuning.jobs.create(model="tuneforge/tiny-chat", training_file=file_id)
    assert job.organization_id == "default"
    other = new_project(client)
    with pytest.raises(openai.NotFoundError):
        other.openai.files.retrieve(file_id)


def test_generated_admin_key_is_written_once_private(tmp_path: object) -> None:
    from pathlib import Path

    data_dir = Path(str(tmp_path))
    settings = Settings(data_dir=data_dir)
    first = resolve_admin_key(settings)
    assert first == resolve_admin_key(Settings(data_dir=data_dir))
    path = data_dir / "admin_key"
    assert path.read_text().strip() == first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    configured = Settings(data_dir=data_dir, admin_key="from-env")  # type: ignore[arg-type]
    assert resolve_admin_key(configured) == "from-env"
