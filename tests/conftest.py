"""Fixtures shared by every room's tests. Each room adds its own in tests/<room>/conftest.py."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import RedisServer, pg_database

DATA = Path(__file__).parent / "data"

# One tiny-chat build per test run, shared by every process the tests start (API, workers).
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A models directory for the whole run, exported as TUNEFORGE_MODELS_DIR for subprocesses.

    Under pytest-xdist every test process gets its own base temp directory inside one shared
    parent; the models directory lives in that parent, so the processes share one tiny-chat
    build (`build_tiny_chat` takes a file lock: one builds, the others wait and reuse it)."""
    base = tmp_path_factory.getbasetemp()
    path = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "models"
    path.mkdir(exist_ok=True)
    previous = os.environ.get("TUNEFORGE_MODELS_DIR")
    os.environ["TUNEFORGE_MODELS_DIR"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("TUNEFORGE_MODELS_DIR", None)
    else:
        os.environ["TUNEFORGE_MODELS_DIR"] = previous


@pytest.fixture(scope="session")
def tiny_chat_path(models_dir: Path) -> Path:
    """The built tuneforge/tiny-chat directory (built once per run)."""
    from tuneforge.training.tiny_chat import build_tiny_chat

    return build_tiny_chat(models_dir)


@pytest.fixture(scope="session")
def qa_path() -> Path:
    """32 question-and-answer pairs in OpenAI chat format."""
    return DATA / "qa.jsonl"


# --- a real S3 endpoint, shared by storage, worker and e2e tests ---
@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's server mode on 127.0.0.1 (a real S3 HTTP endpoint), with dummy credentials exported
    so that subprocesses (API, workers) reach it too."""
    from moto.server import ThreadedMotoServer

    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        os.environ[name] = value
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for the module on the shared server, migrated to head,
    dropped afterwards."""
    with pg_database("tf_worker") as url:
        yield url


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private redis-server for the module, on a free port, without persistence."""
    with RedisServer(directory=tmp_path_factory.mktemp("redis")) as server:
        yield server.url(0)
