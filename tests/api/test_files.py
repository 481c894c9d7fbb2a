"""Files through the official SDK: upload, list, retrieve, download byte for byte, delete."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as settings_
from hypothesis import strategies as st
from sqlalchemy import func, select

from tests.api.conftest import ProjectCtx
from tests.support import free_port, wait_for
from tuneforge.config import Settings
from tuneforge.models.file import File


def test_upload_retrieve_download_delete(project: ProjectCtx, chat_jsonl: str) -> None:
    created = project.openai.files.create(file=("qa.jsonl", chat_jsonl.encode()), purpose="fine-tune")
    assert created.id.startswith("file-")
    assert created.object == "file"
    assert created.bytes == len(chat_jsonl.encode())
    assert created.filename == "qa.jsonl"
    assert created.purpose == "fine-tune"
    assert isinstance(created.created_at, int)

    assert project.openai.files.retrieve(created.id).id == created.id
    assert project.openai.files.content(created.id).content == chat_jsonl.encode()

    deleted = project.openai.files.delete(created.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (created.id, "file", True)
    with pytest.raises(openai.NotFoundError):
        project.openai.files.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        project.openai.files.content(created.id)


def test_upload_records_format_and_counts(project: ProjectCtx, app: object, chat_jsonl: str) -> None:
    from tuneforge.models.file import File

    file_id = project.upload(chat_jsonl)
    with app.state.sessionmaker() as session:  # type: ignore[attr-defined]
        row = session.get(File, file_id)
        assert row is not None
        assert row.format == "chat"
        assert row.examples == 32
        assert row.approx_tokens and row.approx_tokens > 0
        assert app.state.store.get_bytes(row.storage_key) == chat_jsonl.encode()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("line", "fmt"),
    [
        ({"prompt": "a", "completion": "b"}, "prompt_completion"),
        ({"instruction": "a", "input": "", "output": "b"}, "alpaca"),
        ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}, "sharegpt"),
        ({"prompt": "a", "chosen": "b", "rejected": "c"}, "preference"),
        ({"text": "raw text"}, "text"),
    ],
)
def test_every_format_is_accepted(
    project: ProjectCtx, app: object, line: dict[str, object], fmt: str
) -> None:
    from tuneforge.models.file import File

    file_id = project.upload(json.dumps(line) + "\n" + json.dumps(line) + "\n")
    with app.state.sessionmaker() as session:  # type: ignore[attr-defined]
        row = session.get(File, file_id)
        assert row is not None and row.format == fmt and row.examples == 2


def test_list_pages_newest_first(project: ProjectCtx, chat_jsonl: str) -> None:
    ids = [project.upload(chat_jsonl, f"f{i}.jsonl") for i in range(5)]
    page = project.client.get("/v1/files", params={"limit": 2}, headers=project.headers).json()
    assert page["object"] == "list"
    assert [f["id"] for f in page["data"]] == ids[::-1][:2]
    assert page["has_more"] is True
    seen = [f.id for f in project.openai.files.list(limit=2)]  # the SDK pages with `after`
    assert seen == ids[::-1]
    ascending = project.client.get("/v1/files", params={"order": "asc"}, headers=project.headers).json()
    assert [f["id"] for f in ascending["data"]] == ids


def test_files_are_scoped_to_the_project(
    project: ProjectCtx, other_project: ProjectCtx, chat_jsonl: str
) -> None:
    file_id = project.upload(chat_jsonl)
    assert [f.id for f in other_project.openai.files.list()] == []
    with pytest.raises(openai.NotFoundError):
        other_project.openai.files.retrieve(file_id)
    with pytest.raises(openai.NotFoundError):
        other_project.openai.files.content(file_id)
    with pytest.raises(openai.NotFoundError):
        other_project.openai.files.delete(file_id)
    assert project.openai.files.retrieve(file_id).id == file_id


def test_fields_after_the_file_part_are_read(project: ProjectCtx, chat_jsonl: str) -> None:
    boundary = "xyzBOUNDARYxyz"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="late.jsonl"\r\n'
        f"Content-Type: application/jsonl\r\n\r\n{chat_jsonl}\r\n"
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        f"--{boundary}--\r\n"
    ).encode()
    response = project.client.post(
        "/v1/files",
        content=body,
        headers={**project.headers, "Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["filename"] == "late.jsonl"
    assert response.json()["bytes"] == len(chat_jsonl.encode())


@contextmanager
def changed_settings(app: FastAPI, **changes: Any) -> Iterator[None]:
    """The app's settings with `changes`, for the requests made inside the block."""
    previous = app.state.settings
    app.state.settings = previous.model_copy(update=changes)
    try:
        yield
    finally:
        app.state.settings = previous


def _stored(app: FastAPI) -> tuple[int, int]:
    with app.state.sessionmaker() as session:
        rows = session.scalar(select(func.count()).select_from(File))
    return int(rows or 0), len(list(app.state.store.list("files/")))


def _multipart(
    project: ProjectCtx, body: Any, boundary: str = "tf-boundary", **headers: str
) -> httpx.Response:
    return project.client.post(
        "/v1/files",
        content=body,
        headers={**project.headers, "Content-Type": f"multipart/form-data; boundary={boundary}", **headers},
    )


def test_non_ascii_filename_downloads(project: ProjectCtx, chat_jsonl: str) -> None:
    data = chat_jsonl.encode()
    created = project.openai.files.create(file=("数据.jsonl", data), purpose="fine-tune")
    assert created.filename == "数据.jsonl"
    assert project.openai.files.retrieve(created.id).filename == "数据.jsonl"
    content = project.openai.files.content(created.id)
    assert content.content == data
    disposition = content.response.headers["content-disposition"]
    assert disposition == "attachment; filename=\"__.jsonl\"; filename*=UTF-8''%E6%95%B0%E6%8D%AE.jsonl"


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("../../../../etc/passwd", "passwd"),
        ("/abs/dir/train.jsonl", "train.jsonl"),
        ("..", "upload.jsonl"),
        ("..\\..\\win.jsonl", "win.jsonl"),
    ],
)
def test_upload_keeps_only_the_base_name(project: ProjectCtx, chat_jsonl: str, sent: str, kept: str) -> None:
    created = project.openai.files.create(file=(sent, chat_jsonl.encode()), purpose="fine-tune")
    assert created.filename == kept
    content = project.openai.files.content(created.id)
    assert content.content == chat_jsonl.encode()
    assert content.response.headers["content-disposition"].isascii()


def test_filename_cleaning() -> None:
    from tuneforge.api.services.files import clean_filename, content_disposition

    assert clean_filename("C:\\Users\\me\\train.jsonl") == "train.jsonl"
    assert clean_filename("a\x00b\x1f\x7f.jsonl") == "ab.jsonl"
    assert clean_filename(None) == "upload.jsonl"
    assert clean_filename("x" * 600) == "x" * 255
    assert content_disposition("plain.jsonl") == 'attachment; filename="plain.jsonl"'
    assert content_disposition('a"b\\c.csv') == (
        "attachment; filename=\"a_b_c.csv\"; filename*=UTF-8''a%22b%5Cc.csv"
    )


def test_a_line_over_the_limit_is_refused_naming_it(project: ProjectCtx, app: FastAPI) -> None:
    good = json.dumps({"text": "short"})
    long_line = json.dumps({"text": "x" * (100 << 10)})
    before = _stored(app)
    with changed_settings(app, max_upload_line_bytes=64 << 10):
        with pytest.raises(openai.BadRequestError) as refused:
            project.upload(f"{good}\n{good}\n{long_line}\n{good}\n")
        assert refused.value.param == "file" and refused.value.code == "invalid_file_format"
        assert "line 3" in refused.value.message and str(64 << 10) in refused.value.message
        # A last line without a newline counts too.
        with pytest.raises(openai.BadRequestError) as refused:
            project.upload(f"{good}\n{long_line}")
        assert "line 2" in refused.value.message
        assert project.upload(f"{good}\n{json.dumps({'text': 'x' * (60 << 10)})}\n").startswith("file-")
    assert _stored(app)[0] == before[0] + 1


def test_form_fields_are_capped(project: ProjectCtx, app: FastAPI, chat_jsonl: str) -> None:
    before = _stored(app)
    boundary = "tf-boundary"
    file_part = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n'
        f"{chat_jsonl}\r\n"
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
    )
    extra = "".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="x{i}"\r\n\r\n{"v" * 1000}\r\n'
        for i in range(30)
    )
    response = _multipart(project, (file_part + extra + f"--{boundary}--\r\n").encode())
    assert response.status_code == 400, response.text
    assert "parts" in response.json()["error"]["message"]

    header = "X-Junk: " + "h" * (20 << 10)
    long_header = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="x"\r\n{header}\r\n\r\nv\r\n'
        + file_part
        + f"--{boundary}--\r\n"
    )
    assert _multipart(project, long_header.encode()).status_code == 400
    assert _stored(app) == before


def test_a_chunked_body_over_the_limit_is_413(project: ProjectCtx, app: FastAPI, chat_jsonl: str) -> None:
    """Without a Content-Length the limit holds all the same, whatever part the bytes are in."""
    before = _stored(app)
    boundary = "tf-boundary"

    def body() -> Iterator[bytes]:
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n'
            f"{chat_jsonl}\r\n"
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
            f"--{boundary}\r\nContent-Type: text/plain\r\n\r\n"
        ).encode()
        for _ in range(40):  # 2.5 MiB in a part with no name; this app's limit is 1 MiB
            yield b"j" * (64 << 10)
        yield f"\r\n--{boundary}--\r\n".encode()

    response = _multipart(project, body())
    assert response.status_code == 413, response.text
    assert response.json()["error"]["param"] == "file"
    assert _stored(app) == before


@pytest.mark.parametrize(
    "body",
    [
        b"this is not multipart at all",
        b"--tf-boundary\r\nBroken header line\r\n\r\nx\r\n--tf-boundary--\r\n",
        b"--tf-boundaryX\r\n",
    ],
)
def test_a_malformed_multipart_body_is_400(project: ProjectCtx, app: FastAPI, body: bytes) -> None:
    before = _stored(app)
    response = _multipart(project, body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "file"
    assert _stored(app) == before


def test_stale_partial_writes_are_removed_at_start(settings: Settings, app: FastAPI) -> None:
    """A process killed mid-upload leaves a temporary file in the store; the API removes old ones
    when it starts and keeps recent ones (a write in progress)."""
    from tuneforge.api.app import create_app

    root = Path(urllib.parse.urlparse(settings.storage_url).path)
    stale = root / "files" / ".upload-killed"
    fresh = root / "files" / ".upload-in-progress"
    for path in (stale, fresh):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 1024)
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(stale, (two_days_ago, two_days_ago))
    with TestClient(create_app(settings)):
        wait_for(lambda: not stale.exists(), 30, "the stale temporary file to be removed")
    assert fresh.exists()
    fresh.unlink()


# --- against a real HTTP server: stalled and concurrent uploads -------------------------------


@dataclass
class LiveServer:
    app: FastAPI
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def sdk(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url + "/v1", api_key=key, max_retries=0, timeout=60)

    def stalled_upload(self, key: str) -> socket.socket:
        """An upload that sends its headers and the start of its file, then nothing."""
        start = (
            b'--tf-boundary\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
            b'--tf-boundary\r\nContent-Disposition: form-data; name="file"; filename="slow.jsonl"\r\n\r\n'
            b'{"text": "the first line"}\n{"text": "the sec'
        )
        head = (
            "POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {key}\r\n"
            "Content-Type: multipart/form-data; boundary=tf-boundary\r\n"
            "Content-Length: 100000\r\n\r\n"
        ).encode()
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=60)
        sock.sendall(head + start)
        return sock


@pytest.fixture
def live_server(settings: Settings) -> Iterator[LiveServer]:
    """The app under uvicorn in a thread of this process (so a test can change its settings)."""
    import uvicorn

    from tuneforge.api.app import create_app

    app = create_app(settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 60, "uvicorn to start")
    yield LiveServer(app, port)
    server.should_exit = True
    thread.join(30)


def _read_status(sock: socket.socket) -> int:
    sock.settimeout(60)
    received = b""
    while b"\r\n" not in received:
        chunk = sock.recv(4096)
        if not chunk:
            break
        received += chunk
    return int(received.split(b" ", 2)[1])


def test_an_upload_that_stalls_times_out(live_server: LiveServer, project: ProjectCtx) -> None:
    app = live_server.app
    before = _stored(app)
    with changed_settings(app, upload_idle_timeout_seconds=1.0):
        sock = live_server.stalled_upload(project.key)
        try:
            assert _read_status(sock) == 408
        finally:
            sock.close()
    assert _stored(app) == before
    assert not list(Path(urllib.parse.urlparse(app.state.settings.storage_url).path).rglob(".upload-*"))


def test_one_project_cannot_hold_every_upload(
    live_server: LiveServer, project: ProjectCtx, other_project: ProjectCtx, chat_jsonl: str
) -> None:
    """A project over its concurrent-upload limit gets OpenAI's 429; other projects upload on."""
    from tuneforge.api.services import files as upload_service

    app = live_server.app
    data = chat_jsonl.encode()
    with changed_settings(app, max_concurrent_uploads_per_project=2, upload_idle_timeout_seconds=300.0):
        stalled = [live_server.stalled_upload(project.key) for _ in range(2)]
        try:
            wait_for(
                lambda: upload_service._RUNNING[project.id] == 2, 60, "both stalled uploads to be running"
            )
            with pytest.raises(openai.RateLimitError) as refused:
                live_server.sdk(project.key).files.create(file=("x.jsonl", data), purpose="fine-tune")
            assert refused.value.code == "rate_limit_exceeded"
            assert refused.value.type == "requests"
            assert refused.value.response.headers["retry-after"] == "1"
            other = live_server.sdk(other_project.key).files.create(
                file=("x.jsonl", data), purpose="fine-tune"
            )
            assert other.bytes == len(data)
        finally:
            for sock in stalled:
                sock.close()
        wait_for(lambda: upload_service._RUNNING[project.id] == 0, 60, "the stalled uploads to end")
        mine = live_server.sdk(project.key).files.create(file=("x.jsonl", data), purpose="fine-tune")
        assert mine.bytes == len(data)
    assert [f.id for f in project.openai.files.list()] == [mine.id]


@settings_(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    boundary=st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), min_size=0, max_size=80),
    parts=st.lists(
        st.tuples(
            st.sampled_from(
                ['name="file"; filename="a.jsonl"', 'name="purpose"', "", 'name="x"; filename*=x']
            ),
            st.binary(max_size=200),
        ),
        max_size=4,
    ),
    junk=st.binary(max_size=100),
)
def test_no_multipart_body_is_a_server_error(
    project: ProjectCtx, boundary: str, parts: list[tuple[str, bytes]], junk: bytes
) -> None:
    body = b"".join(
        f"--{boundary}\r\nContent-Disposition: form-data; {disposition}\r\n\r\n".encode() + data + b"\r\n"
        for disposition, data in parts
    )
    body += junk + f"--{boundary}--\r\n".encode()
    response = project.client.post(
        "/v1/files",
        content=body,
        headers={**project.headers, "Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert response.status_code < 500, response.text
    assert set(response.json()) == {"error"} or response.status_code == 200
