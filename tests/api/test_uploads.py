"""OpenAI's Uploads API through the official SDK: `upload_file_chunked` with parts smaller than
S3's multipart minimum, a bad line in a later part refused by its line number, md5 and size
checks, the 64 MiB part limit, cancel, expiry by the reconciler (its cleanup, and a real `tuneforge
beat` pass); then, on a real `tuneforge serve` over moto's S3, a 200 MB file with the API
process's memory measured."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import openai
import psutil
import pytest
from fastapi import FastAPI
from openai import OpenAI
from sqlalchemy import select

from tests.api.conftest import TEST_BROKER, ProjectCtx
from tests.support import REPO, start_server, stop_process, stop_server, wait_for
from tuneforge.config import Settings
from tuneforge.db import session_scope, utcnow
from tuneforge.models.file import File
from tuneforge.models.upload import Upload, UploadPart


def _line(i: int, pad: int = 0) -> bytes:
    record = {
        "messages": [
            {"role": "user", "content": f"Question {i}?" + " x" * pad},
            {"role": "assistant", "content": f"Answer {i}."},
        ]
    }
    return json.dumps(record).encode() + b"\n"


def _jsonl(lines: int, pad: int = 0) -> bytes:
    return b"".join(_line(i, pad) for i in range(lines))


def _error(exc: openai.APIStatusError) -> dict[str, str]:
    """The error object of an answer (the SDK hands over the inside of `{"error": ...}`)."""
    assert isinstance(exc.body, dict), exc
    return exc.body


def _chunked(client: OpenAI, data: bytes, part_size: int, **kwargs: object) -> openai.types.Upload:
    return client.uploads.upload_file_chunked(
        file=data,
        filename="big.jsonl",
        bytes=len(data),
        mime_type="application/jsonl",
        purpose="fine-tune",
        part_size=part_size,
        **kwargs,  # type: ignore[arg-type]
    )


def test_chunked_upload_gives_a_usable_file(project: ProjectCtx, app: FastAPI) -> None:
    data = _jsonl(400)  # ~40 KB in parts of 3001 bytes: lines split across parts
    upload = _chunked(project.openai, data, 3001, md5=hashlib.md5(data).hexdigest())
    assert upload.object == "upload"
    assert upload.status == "completed"
    assert upload.id.startswith("upload_")
    assert upload.bytes == len(data)
    assert upload.file is not None
    file = upload.file
    assert (file.object, file.bytes, file.filename, file.purpose) == (
        "file",
        len(data),
        "big.jsonl",
        "fine-tune",
    )
    assert project.openai.files.retrieve(file.id).bytes == len(data)
    assert project.openai.files.content(file.id).content == data
    with app.state.sessionmaker() as session:
        row = session.get(File, file.id)
        assert row is not None
        assert (row.format, row.examples) == ("chat", 400)


def test_bad_line_in_part_three_names_the_line(project: ProjectCtx) -> None:
    lines = [_line(i) for i in range(60)]
    part_size = 1000
    offset = 2 * part_size + 10  # a byte in the third part
    bad = next(i for i in range(60) if sum(len(x) for x in lines[: i + 1]) > offset)
    lines[bad] = b'{"messages": [{"role": "user", "content": "hi"}\n'  # truncated JSON
    data = b"".join(lines)
    with pytest.raises(openai.BadRequestError) as caught:
        _chunked(project.openai, data, part_size)
    error = _error(caught.value)
    assert f"line {bad + 1}" in error["message"], error
    assert error["code"] == "invalid_file_format"
    assert error["param"] == "part_ids"
    assert project.openai.files.list().data == []


def test_completion_checks_md5_size_and_parts(project: ProjectCtx) -> None:
    client = project.openai
    data = _jsonl(20)
    upload = client.uploads.create(
        bytes=len(data), filename="a.jsonl", mime_type="text/jsonl", purpose="fine-tune"
    )
    assert (upload.status, upload.file) == ("pending", None)
    first = client.uploads.parts.create(upload.id, data=data[:500])
    assert (first.object, first.upload_id) == ("upload.part", upload.id)
    with pytest.raises(openai.BadRequestError) as short:
        client.uploads.complete(upload.id, part_ids=[first.id])
    assert _error(short.value)["param"] == "part_ids"
    second = client.uploads.parts.create(upload.id, data=data[500:])
    with pytest.raises(openai.BadRequestError) as wrong_md5:
        client.uploads.complete(upload.id, part_ids=[first.id, second.id], md5="0" * 32)
    assert _error(wrong_md5.value)["param"] == "md5"
    with pytest.raises(openai.BadRequestError) as unknown:
        client.uploads.complete(upload.id, part_ids=[first.id, "part_nope"])
    assert _error(unknown.value)["param"] == "part_ids.1"
    with pytest.raises(openai.BadRequestError) as too_much:
        client.uploads.parts.create(upload.id, data=b"{}\n")
    assert _error(too_much.value)["param"] == "data"
    done = client.uploads.complete(upload.id, part_ids=[first.id, second.id])
    assert done.status == "completed"
    assert done.file is not None
    assert client.files.content(done.file.id).content == data
    with pytest.raises(openai.BadRequestError):
        client.uploads.complete(upload.id, part_ids=[first.id, second.id])


def test_create_refusals_cancel_and_other_projects(project: ProjectCtx, other_project: ProjectCtx) -> None:
    client = project.openai
    with pytest.raises(openai.APIStatusError) as too_big:
        client.uploads.create(
            bytes=9 << 30, filename="a.jsonl", mime_type="application/jsonl", purpose="fine-tune"
        )
    assert too_big.value.status_code == 413
    with pytest.raises(openai.BadRequestError) as purpose:
        client.uploads.create(bytes=10, filename="a.jsonl", mime_type="application/jsonl", purpose="batch")
    assert _error(purpose.value)["param"] == "purpose"
    with pytest.raises(openai.BadRequestError) as missing:
        client.post("/uploads", body={"filename": "a.jsonl"}, cast_to=object)
    assert missing.value.status_code == 400

    upload = client.uploads.create(
        bytes=10, filename="a.jsonl", mime_type="application/jsonl", purpose="fine-tune"
    )
    with pytest.raises(openai.NotFoundError):
        other_project.openai.uploads.parts.create(upload.id, data=b"{}")
    with pytest.raises(openai.NotFoundError):
        other_project.openai.uploads.cancel(upload.id)
    client.uploads.parts.create(upload.id, data=b'{"text"')
    cancelled = client.uploads.cancel(upload.id)
    assert cancelled.status == "cancelled"
    with pytest.raises(openai.BadRequestError):
        client.uploads.parts.create(upload.id, data=b"{}")


def test_reconciler_expires_pending_uploads_and_removes_parts(project: ProjectCtx, app: FastAPI) -> None:
    from tuneforge.worker.reconciler import expire_uploads

    client = project.openai
    upload = client.uploads.create(
        bytes=100, filename="a.jsonl", mime_type="application/jsonl", purpose="fine-tune"
    )
    part = client.uploads.parts.create(upload.id, data=b'{"text": "a"}\n')
    store = app.state.store
    sessions = app.state.sessionmaker
    with sessions() as session:
        key = session.get(UploadPart, part.id).storage_key  # type: ignore[union-attr]
    assert store.exists(key)
    with session_scope(sessions) as session:
        row = session.get(Upload, upload.id)
        assert row is not None
        row.expires_at = utcnow() - timedelta(seconds=1)
    with pytest.raises(openai.BadRequestError) as expired:
        client.uploads.parts.create(upload.id, data=b"{}")
    assert _error(expired.value)["code"] == "upload_expired"

    completed = _chunked(client, _jsonl(10), 300)  # its part rows wait for the reconciler

    cleaned = expire_uploads(sessions, store, utcnow())
    assert upload.id in cleaned and completed.id in cleaned
    assert not store.exists(key)
    with sessions() as session:
        row = session.get(Upload, upload.id)
        assert row is not None
        assert row.status == "expired"
        assert session.get(UploadPart, part.id) is None
        assert session.scalars(select(UploadPart).where(UploadPart.upload_id == completed.id)).all() == []
    assert list(store.list(f"uploads/{completed.id}/")) == []


def test_a_part_over_64_mib_is_refused(project: ProjectCtx, app: FastAPI) -> None:
    """OpenAI's limit: a part of exactly 64 MiB is taken, one byte more is a 413 naming `data`,
    whether the request says its length (the SDK) or comes without one (chunked transfer
    encoding, so only the parser's count can refuse it), and nothing of a refused part is left in
    the store or the database."""
    from tuneforge.api.services.uploads import MAX_PART_BYTES

    assert MAX_PART_BYTES == 64 << 20
    client = project.openai
    upload = client.uploads.create(
        bytes=4 * MAX_PART_BYTES, filename="a.jsonl", mime_type="application/jsonl", purpose="fine-tune"
    )
    whole = client.uploads.parts.create(upload.id, data=b"x" * MAX_PART_BYTES)
    assert (whole.object, whole.upload_id) == ("upload.part", upload.id)

    with pytest.raises(openai.APIStatusError) as declared:
        client.uploads.parts.create(upload.id, data=b"x" * (MAX_PART_BYTES + 1))
    assert declared.value.status_code == 413
    assert _error(declared.value)["param"] == "data"
    assert str(MAX_PART_BYTES) in _error(declared.value)["message"]

    boundary = "tuneforge-test-boundary"

    def streamed() -> Iterator[bytes]:
        yield f'--{boundary}\r\nContent-Disposition: form-data; name="data"; filename="p"\r\n\r\n'.encode()
        chunk = b"x" * (1 << 20)
        for _ in range(64):
            yield chunk
        yield b"x"  # byte 64 MiB + 1
        yield f"\r\n--{boundary}--\r\n".encode()

    answer = project.client.post(
        f"/v1/uploads/{upload.id}/parts",
        headers={**project.headers, "Content-Type": f"multipart/form-data; boundary={boundary}"},
        content=streamed(),
    )
    assert answer.status_code == 413, answer.text
    assert answer.json()["error"]["param"] == "data"

    store = app.state.store
    with app.state.sessionmaker() as session:
        parts = session.scalars(select(UploadPart).where(UploadPart.upload_id == upload.id)).all()
        assert [part.id for part in parts] == [whole.id]
        kept = parts[0].storage_key
    assert [(o.key, o.size) for o in store.list(f"uploads/{upload.id}/")] == [(kept, MAX_PART_BYTES)]
    assert client.uploads.cancel(upload.id).status == "cancelled"


def test_the_reconcilers_scheduled_pass_expires_an_old_upload(
    project: ProjectCtx, app: FastAPI, settings: Settings, tmp_path: Path
) -> None:
    """An upload expires an hour after it is created (the default), and the beat's periodic
    reconcile pass (`tuneforge beat`, every second here) expires one past its hour and removes its
    part, with nobody calling the cleanup."""
    client = project.openai
    upload = client.uploads.create(
        bytes=100, filename="a.jsonl", mime_type="application/jsonl", purpose="fine-tune"
    )
    assert upload.expires_at - upload.created_at == 3600
    part = client.uploads.parts.create(upload.id, data=b'{"text": "a"}\n')
    sessions = app.state.sessionmaker
    with sessions() as session:
        key = session.get(UploadPart, part.id).storage_key  # type: ignore[union-attr]
    assert app.state.store.exists(key)
    with session_scope(sessions) as session:
        row = session.get(Upload, upload.id)
        assert row is not None
        row.expires_at = utcnow() - timedelta(seconds=1)

    def status() -> str | None:
        with sessions() as session:
            row = session.get(Upload, upload.id)
            return row.status if row is not None and row.status == "expired" else None

    env = {
        "TUNEFORGE_DATABASE_URL": settings.database_url,
        "TUNEFORGE_STORAGE_URL": settings.storage_url,
        "TUNEFORGE_DATA_DIR": str(tmp_path / "beat"),
        "TUNEFORGE_BROKER_URL": TEST_BROKER,
        "TUNEFORGE_RECONCILE_EVERY_SECONDS": "1",
    }
    log_path = tmp_path / "beat.log"
    with log_path.open("wb") as log:
        beat = subprocess.Popen(
            [sys.executable, "-m", "tuneforge.cli", "beat"],
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=REPO,
            start_new_session=True,
        )
    try:
        wait_for(
            status, 180, "the beat's pass to expire the upload", lambda: log_path.read_text(errors="replace")
        )
    finally:
        stop_process(beat, signal.SIGTERM, timeout=30)
    assert not app.state.store.exists(key)
    with sessions() as session:
        assert session.get(UploadPart, part.id) is None
    with pytest.raises(openai.BadRequestError) as late:
        client.uploads.parts.create(upload.id, data=b"{}")
    assert _error(late.value)["code"] == "upload_expired"  # the same code as before the pass


# --- a real server over S3: the 200 MB case and the API process's memory ---


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str) -> Iterator[tuple[str, int]]:
    """`tuneforge serve` (SQLite, moto's S3, a broker nobody reads) -> (base URL, pid)."""
    import uuid

    from tuneforge.storage.s3 import S3Store

    bucket = f"tf-uploads-{uuid.uuid4().hex[:8]}"
    S3Store(bucket, endpoint_url=s3_endpoint, create_bucket=True)
    server = start_server(
        {
            "TUNEFORGE_STORAGE_URL": f"s3://{bucket}/objects",
            "TUNEFORGE_S3_ENDPOINT_URL": s3_endpoint,
            "TUNEFORGE_BROKER_URL": "redis://127.0.0.1:1/0",
            "TUNEFORGE_ADMIN_KEY": "tf-admin-uploads-0123456789",
        },
        tmp_path_factory.mktemp("uploads-server"),
    )
    try:
        yield server.base_url, server.process.pid
    finally:
        stop_server(server)


def _peak_rss_during(pid: int, work: object) -> tuple[int, int]:
    """(RSS before, peak RSS while `work()` runs) of process `pid`, sampled every 10 ms."""
    process = psutil.Process(pid)
    before = process.memory_info().rss
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        work()  # type: ignore[operator]
    finally:
        done.set()
        sampler.join()
    return before, peak


@pytest.mark.slow
def test_200_mb_in_small_parts_over_s3_keeps_api_memory_flat(
    s3_server: tuple[str, int], tmp_path: Path
) -> None:
    base_url, pid = s3_server
    client = OpenAI(
        base_url=base_url + "/v1", api_key="tf-admin-uploads-0123456789", max_retries=0, timeout=300
    )
    path = tmp_path / "big.jsonl"
    line = _line(0, pad=900)  # ~1.8 KB a line
    count = (200 << 20) // len(line) + 1
    with path.open("wb") as out:
        for i in range(count):
            out.write(_line(i, pad=900))
    size = path.stat().st_size
    md5 = hashlib.md5()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            md5.update(chunk)
    part_size = 3 << 20  # under S3's 5 MiB multipart minimum

    warm = _jsonl(2000)  # the first requests import and allocate what every later one reuses
    _chunked(client, warm, 50_000)

    result: list[openai.types.Upload] = []
    started = time.monotonic()
    before, peak = _peak_rss_during(
        pid,
        lambda: result.append(
            client.uploads.upload_file_chunked(
                file=path,
                mime_type="application/jsonl",
                purpose="fine-tune",
                part_size=part_size,
                md5=md5.hexdigest(),  # the server checks the assembled file against it
            )
        ),
    )
    seconds = time.monotonic() - started
    upload = result[0]
    assert upload.status == "completed" and upload.file is not None
    assert upload.file.bytes == size
    growth = peak - before
    print(f"200 MB chunked upload: {seconds:.1f} s, API RSS {before >> 20} MiB -> peak {peak >> 20} MiB")
    assert growth < 50 << 20, f"the API's RSS grew by {growth >> 20} MiB"
