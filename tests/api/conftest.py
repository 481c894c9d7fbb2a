"""API fixtures: every test here runs on SQLite and on PostgreSQL.

A throwaway database per backend and test run (PostgreSQL: a uniquely named database on
127.0.0.1:5432, dropped afterwards), its schema built by the migrations; one app per backend,
driven in-process through the official `openai` SDK (its http_client is a TestClient) and raw
httpx; a fresh project and key per test so tests never see each other's objects. Job messages
go to a private redis-server of this suite, where no worker consumes them, so jobs stay in
validating_files. The helpers (projects, keys, servers) live in tests.support.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.support import RedisServer, create_database, drop_database, free_port
from tests.support.api import (  # noqa: F401  (re-exported for the tests of this folder)
    ADMIN_KEY,
    ProjectCtx,
    admin_request,
    mark_validated,
    new_project,
    sdk,
)
from tests.support.server import Server, start_server, stop_server  # noqa: F401
from tuneforge.config import Settings, get_settings
from tuneforge.db import migrate

# This suite's own redis-server, started by `_test_broker`; the port is chosen at import so that
# tests can name the URL.
TEST_BROKER = f"redis://127.0.0.1:{free_port()}/0"
REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"


@pytest.fixture(scope="session", autouse=True)
def _test_broker() -> Iterator[None]:
    """Job messages of in-process apps go to this suite's redis-server (read by get_settings in
    dispatch)."""
    previous = os.environ.get("TUNEFORGE_BROKER_URL")
    os.environ["TUNEFORGE_BROKER_URL"] = TEST_BROKER
    get_settings.cache_clear()
    with RedisServer(port=int(TEST_BROKER.rsplit(":", 1)[1].split("/")[0])):
        yield
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
    name, url = create_database("tf_test")
    try:
        migrate(url)
        yield url
    finally:
        drop_database(name)


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
