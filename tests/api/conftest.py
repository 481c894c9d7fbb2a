"""API fixtures: every test here runs on SQLite and on PostgreSQL.

A throwaway database per backend and test run (PostgreSQL: a uniquely named database on
127.0.0.1:5432, dropped afterwards), its schema built by the migrations; one app per backend,
driven in-process through the official `openai` SDK (its http_client is a TestClient) and raw
httpx; a fresh project and key per test so tests never see each other's objects. Job messages
go to a real Redis broker (db 5, this suite's own), where no worker consumes them, so jobs stay
in validating_files.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from openai import OpenAI

from tuneforge.config import Settings, get_settings
from tuneforge.db import migrate

PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
TEST_BROKER = "redis://127.0.0.1:6379/5"
ADMIN_KEY = "tf-admin-test-key-0123456789"
REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"


def create_pg_database() -> tuple[str, str]:
    name = f"tf_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name, f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def drop_pg_database(name: str) -> None:
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session", autouse=True)
def _test_broker() -> Iterator[None]:
    """Job messages of in-process apps go to Redis db 5 (read by get_settings in dispatch)."""
    previous = os.environ.get("TUNEFORGE_BROKER_URL")
    os.environ["TUNEFORGE_BROKER_URL"] = TEST_BROKER
    get_settings.cache_clear()
    yield
    import redis

    redis.Redis.from_url(TEST_BROKER).flushdb()
    if previous is None:
        os.environ.pop("TUNEFORGE_BROKER_URL", None)
    else:
        os.environ["TUNEFORGE_BROKER_URL"] = previous
    get_settings.cache_clear()


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def database_url(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'tuneforge.db'}"
        migrate(url)
        yield url
        return
    name, url = create_pg_database()
    try:
        migrate(url)
        yield url
    finally:
        drop_pg_database(name)


@pytest.fixture(scope="session")
def settings(database_url: str, models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    data_dir = tmp_path_factory.mktemp("data")
    return Settings(
        data_dir=data_dir,
        database_url=database_url,
        broker_url=TEST_BROKER,
        admin_key=ADMIN_KEY,  # type: ignore[arg-type]
        max_upload_bytes=1 << 20,
    )


@pytest.fixture(scope="session")
def app(settings: Settings) -> Iterator[FastAPI]:
    from tuneforge.api.app import create_app

    application = create_app(settings)
    yield application
    application.state.engine.dispose()


@pytest.fixture(scope="session")
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


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


def new_project(client: TestClient, name: str = "test") -> ProjectCtx:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    project = client.post("/v1/admin/projects", json={"name": name}, headers=admin)
    assert project.status_code == 200, project.text
    key = client.post(f"/v1/admin/projects/{project.json()['id']}/api_keys", headers=admin)
    assert key.status_code == 200, key.text
    value = key.json()["value"]
    return ProjectCtx(project.json()["id"], value, client, sdk(client, value))


@pytest.fixture
def project(client: TestClient) -> ProjectCtx:
    return new_project(client)


@pytest.fixture
def other_project(client: TestClient) -> ProjectCtx:
    return new_project(client, "other")


@pytest.fixture(scope="session")
def chat_jsonl() -> str:
    return (DATA / "qa.jsonl").read_text()


PREFERENCE_LINE = {
    "input": {"messages": [{"role": "user", "content": "Say hi"}]},
    "preferred_output": [{"role": "assistant", "content": "Hi!"}],
    "non_preferred_output": [{"role": "assistant", "content": "Go away."}],
}


@pytest.fixture(scope="session")
def dpo_jsonl() -> str:
    return "\n".join(json.dumps(PREFERENCE_LINE) for _ in range(8)) + "\n"


# --- real server subprocesses ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    base_url: str
    env: dict[str, str]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_server(env_overrides: dict[str, str], data_dir: Path, *, migrate_first: bool = True) -> Server:
    """`tuneforge migrate` then `tuneforge serve` on a free port, as `make run` does."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEFORGE_")}
    env.update({"TUNEFORGE_DATA_DIR": str(data_dir), **env_overrides})
    if "TUNEFORGE_MODELS_DIR" in os.environ:
        env.setdefault("TUNEFORGE_MODELS_DIR", os.environ["TUNEFORGE_MODELS_DIR"])
    script = Path(sys.executable).parent / "tuneforge"
    tuneforge = [str(script)] if script.exists() else [sys.executable, "-m", "tuneforge.cli"]
    if migrate_first:
        subprocess.run([*tuneforge, "migrate"], env=env, check=True, capture_output=True, timeout=120)
    port = free_port()
    log_path = data_dir / f"server-{port}.log"
    data_dir.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*tuneforge, "serve", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    server = Server(process, f"http://127.0.0.1:{port}", env, log_path)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"tuneforge serve exited with {process.returncode}:\n{server.log()}")
        try:
            if httpx.get(server.base_url + "/healthz", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    stop_server(server)
    raise RuntimeError(f"tuneforge serve did not answer in 60 s:\n{server.log()}")


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


def admin_request(server: Server, method: str, path: str, key: str, **kwargs: Any) -> Any:
    response = httpx.request(
        method, server.base_url + path, headers={"Authorization": f"Bearer {key}"}, timeout=30, **kwargs
    )
    assert response.status_code == 200, response.text
    return response.json()


def mark_validated(app: FastAPI, job_id: str) -> None:
    """validating_files -> queued, as a worker's file validation would (this suite runs no worker)."""
    from tuneforge.db import session_scope
    from tuneforge.models.job import JobStatus, change_status

    with session_scope(app.state.sessionmaker) as session:
        assert change_status(session, job_id, JobStatus.QUEUED, sources=[JobStatus.VALIDATING_FILES])
