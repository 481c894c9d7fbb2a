"""A real `tuneforge serve` process, as `make run` starts it, driven with the openai SDK: the
embedded defaults (SQLite, filesystem store), 50 concurrent job creations on PostgreSQL, and
the memory bound of a 200 MB upload."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from openai import OpenAI

from tests.api.conftest import (
    ADMIN_KEY,
    TEST_BROKER,
    Server,
    admin_request,
    start_server,
    stop_server,
)

MODEL = "tuneforge/tiny-chat"


def _client(server: Server, key: str, **kwargs: object) -> OpenAI:
    return OpenAI(base_url=server.base_url + "/v1", api_key=key, max_retries=0, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def embedded_server(tmp_path: Path, models_dir: Path) -> Iterator[Server]:
    server = start_server({"TUNEFORGE_MAX_UPLOAD_BYTES": str(4 << 20)}, tmp_path / "tuneforge")
    yield server
    stop_server(server)


def test_embedded_serve_end_to_end(embedded_server: Server, chat_jsonl: str, dpo_jsonl: str) -> None:
    server = embedded_server
    data_dir = Path(server.env["TUNEFORGE_DATA_DIR"])
    key_file = data_dir / "admin_key"
    assert key_file.is_file() and (data_dir / "tuneforge.db").is_file()
    assert str(key_file) in server.log()
    admin = _client(server, key_file.read_text().strip())

    uploaded = admin.files.create(file=("qa.jsonl", chat_jsonl.encode()), purpose="fine-tune")
    assert admin.files.content(uploaded.id).content == chat_jsonl.encode()
    assert [f.id for f in admin.files.list()] == [uploaded.id]
    assert admin.files.retrieve(uploaded.id).bytes == len(chat_jsonl.encode())
    assert (data_dir / "objects" / "files" / uploaded.id).is_file()

    job = admin.fine_tuning.jobs.create(
        model=MODEL,
        training_file=uploaded.id,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1}}},
        metadata={"run": "e2e"},
        extra_body={"adapter": {"type": "lora", "r": 4}, "export": ["merged"]},
    )
    dpo_file = admin.files.create(file=("dpo.jsonl", dpo_jsonl.encode()), purpose="fine-tune").id
    dpo_job = admin.fine_tuning.jobs.create(model=MODEL, training_file=dpo_file, method={"type": "dpo"})
    assert [j.id for j in admin.fine_tuning.jobs.list(limit=1)] == [dpo_job.id, job.id]
    assert [j.id for j in admin.fine_tuning.jobs.list(metadata={"run": "e2e"}).data] == [job.id]
    assert admin.fine_tuning.jobs.retrieve(job.id).model_dump()["adapter"]["r"] == 4
    events = [e.message for e in admin.fine_tuning.jobs.list_events(job.id)]
    assert len(events) >= 2 and events[-1].startswith("Created")  # the worker adds the rest
    assert admin.fine_tuning.jobs.checkpoints.list(job.id).object == "list"  # the embedded worker may run it
    if admin.fine_tuning.jobs.retrieve(dpo_job.id).status in ("validating_files", "queued"):
        assert admin.fine_tuning.jobs.cancel(dpo_job.id).status == "cancelled"
    assert next(m.id for m in admin.models.list()) == MODEL

    project = admin_request(server, "POST", "/v1/admin/projects", admin.api_key, json={"name": "p"})
    key = admin_request(server, "POST", f"/v1/admin/projects/{project['id']}/api_keys", admin.api_key)
    assert _client(server, key["value"]).files.list().data == []
    assert admin.files.delete(uploaded.id).deleted
    assert not (data_dir / "objects" / "files" / uploaded.id).exists()
    assert httpx.get(server.base_url + "/readyz").status_code == 200

    line = chat_jsonl.splitlines(keepends=True)[0].encode()
    with pytest.raises(openai.APIStatusError) as too_big:
        admin.files.create(file=("big.jsonl", line * ((5 << 20) // len(line))), purpose="fine-tune")
    assert too_big.value.status_code == 413
    with pytest.raises(openai.AuthenticationError):
        _client(server, "tf-wrong").files.list()


@pytest.fixture
def db_server(tmp_path: Path, models_dir: Path, database_url: str) -> Iterator[Server]:
    """A real server on this run's database of the current backend (jobs stay in validating_files: the broker
    is this suite's Redis db, which no worker reads)."""
    env = {
        "TUNEFORGE_DATABASE_URL": database_url,
        "TUNEFORGE_BROKER_URL": TEST_BROKER,
        "TUNEFORGE_ADMIN_KEY": ADMIN_KEY,
    }
    server = start_server(env, tmp_path / "tuneforge")
    yield server
    stop_server(server)


def test_fifty_concurrent_creates(db_server: Server, chat_jsonl: str) -> None:
    """Exactly 50 jobs with distinct ids and no errors, on PostgreSQL and on SQLite (where the
    writes queue for SQLite's one write lock: a commit must never wait behind them)."""
    server = db_server
    project = admin_request(server, "POST", "/v1/admin/projects", ADMIN_KEY, json={"name": "load"})
    key = admin_request(server, "POST", f"/v1/admin/projects/{project['id']}/api_keys", ADMIN_KEY)["value"]
    http = httpx.Client(limits=httpx.Limits(max_connections=60), timeout=60)
    client = _client(server, key, http_client=http)
    file_id = client.files.create(file=("qa.jsonl", chat_jsonl.encode()), purpose="fine-tune").id
    client.fine_tuning.jobs.cancel(client.fine_tuning.jobs.create(model=MODEL, training_file=file_id).id)
    barrier = threading.Barrier(50)

    def create(i: int) -> str:
        barrier.wait()
        return client.fine_tuning.jobs.create(model=MODEL, training_file=file_id, metadata={"i": str(i)}).id

    with ThreadPoolExecutor(max_workers=50) as pool:
        ids = list(pool.map(create, range(50)))
    assert len(set(ids)) == 50
    listed = [j.id for j in client.fine_tuning.jobs.list(limit=100) if j.status == "validating_files"]
    assert sorted(listed) == sorted(ids)
    for job_id in ids[:5]:
        assert len(client.fine_tuning.jobs.list_events(job_id).data) == 2
    http.close()


def _vm_hwm(pid: int) -> int:
    """Peak resident set size of the process, in bytes (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_200mb_upload_keeps_memory_flat(
    tmp_path: Path, models_dir: Path, backend: str, database_url: str
) -> None:
    env = {"TUNEFORGE_ADMIN_KEY": ADMIN_KEY, "TUNEFORGE_BROKER_URL": TEST_BROKER}
    if backend == "postgresql":
        env["TUNEFORGE_DATABASE_URL"] = database_url
    server = start_server(env, tmp_path / "tuneforge")
    try:
        process = psutil.Process(server.process.pid)
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        httpx.get(server.base_url + "/v1/files", headers=headers).raise_for_status()  # warm up
        baseline = _vm_hwm(process.pid)
        sampled = [process.memory_info().rss]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                sampled.append(process.memory_info().rss)
                time.sleep(0.05)

        line = (
            b'{"messages": [{"role": "user", "content": "What is the capital of France? Please answer."}, '
            b'{"role": "assistant", "content": "The capital of France is Paris, on the Seine."}]}\n'
        )
        block = line * (1 << 20 // len(line) + 1)
        target = 200 * 1000 * 1000
        blocks = target // len(block) + 1
        size = blocks * len(block)
        boundary = "tuneforge-rss-boundary"
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
            "Content-Type: application/jsonl\r\n\r\n"
        ).encode()
        tail = f"\r\n--{boundary}--\r\n".encode()

        def body() -> Iterator[bytes]:
            yield head
            for _ in range(blocks):
                yield block
            yield tail

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        response = httpx.post(
            server.base_url + "/v1/files",
            content=body(),
            headers={
                **headers,
                "Content-Type": f"multipart/form-data; boundary={boundary}",
                "Content-Length": str(len(head) + size + len(tail)),
            },
            timeout=600,
        )
        done.set()
        sampler.join()
        assert response.status_code == 200, response.text
        assert response.json()["bytes"] == size >= target
        growth = max(_vm_hwm(process.pid) - baseline, max(sampled) - sampled[0])
        print(f"200 MB upload ({backend}): peak RSS grew by {growth / 2**20:.1f} MiB")
        assert growth < 100 * 1024 * 1024, f"peak RSS grew by {growth / 2**20:.0f} MiB"
        file_id = response.json()["id"]
        stored = Path(server.env["TUNEFORGE_DATA_DIR"]) / "objects" / "files" / file_id
        assert stored.stat().st_size == size
    finally:
        stop_server(server)


def test_concurrent_cancels_one_wins(db_server: Server, chat_jsonl: str) -> None:
    """Ten clients cancel the same queued job at once: one succeeds, nine get a 400, and the job
    has exactly one cancellation event (conditional UPDATEs; commits never wait behind locks)."""
    server = db_server
    project = admin_request(server, "POST", "/v1/admin/projects", ADMIN_KEY, json={"name": "race"})
    key = admin_request(server, "POST", f"/v1/admin/projects/{project['id']}/api_keys", ADMIN_KEY)["value"]
    http = httpx.Client(limits=httpx.Limits(max_connections=20), timeout=60)
    client = _client(server, key, http_client=http)
    file_id = client.files.create(file=("qa.jsonl", chat_jsonl.encode()), purpose="fine-tune").id
    job_id = client.fine_tuning.jobs.create(model=MODEL, training_file=file_id).id
    barrier = threading.Barrier(10)

    def cancel(_: int) -> int:
        barrier.wait()
        response = http.post(
            f"{server.base_url}/v1/fine_tuning/jobs/{job_id}/cancel",
            headers={"Authorization": f"Bearer {key}"},
        )
        return response.status_code

    with ThreadPoolExecutor(max_workers=10) as pool:
        codes = sorted(pool.map(cancel, range(10)))
    assert codes == [200] + [400] * 9
    assert client.fine_tuning.jobs.retrieve(job_id).status == "cancelled"
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job_id)]
    assert messages.count("Job cancelled.") == 1
    http.close()
