"""200 concurrent clients on a real `tuneforge serve`, in `make run`'s configuration (SQLite, the
embedded worker) and on PostgreSQL (a private Redis, no worker): a mix of job reads, job and event
listings, file listings and job creations; no 5xx and no failed connection."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from tests.support import RedisServer, Server, pg_database, start_server, stop_server
from tests.support.api import ADMIN_KEY, admin_request
from tuneforge.db import make_engine

# `alone`: a capacity test, run by `make test` after the parallel part, with the machine to itself.
pytestmark = [pytest.mark.slow, pytest.mark.alone]

CONCURRENT = 200
ROUNDS = 5  # requests per client, one after the other


@pytest.fixture(params=["embedded", "postgresql"])
def loaded_server(request: pytest.FixtureRequest, tmp_path: Path, models_dir: Path) -> Iterator[Server]:
    with ExitStack() as stack:
        env = {"TUNEFORGE_ADMIN_KEY": ADMIN_KEY}
        if request.param == "postgresql":
            env["TUNEFORGE_DATABASE_URL"] = stack.enter_context(pg_database("tf_load"))
            env["TUNEFORGE_BROKER_URL"] = stack.enter_context(RedisServer()).url()
        server = start_server(env, tmp_path / "tuneforge")
        yield server
        stop_server(server)


async def _burst(
    server: Server, key: str, job_id: str, file_id: str, kinds: int
) -> tuple[Counter[int], list[str]]:
    """CONCURRENT clients, each sending ROUNDS requests of the first `kinds` kinds in turn."""
    create = {"model": "tuneforge/tiny-chat", "training_file": file_id}
    statuses: Counter[int] = Counter()
    failures: list[str] = []
    limits = httpx.Limits(max_connections=CONCURRENT)  # keeps 20 idle, as a default client does
    async with httpx.AsyncClient(
        base_url=server.base_url,
        headers={"Authorization": f"Bearer {key}"},
        timeout=httpx.Timeout(60),  # a client's patience
        limits=limits,
    ) as client:

        async def one(i: int) -> None:
            for round_ in range(ROUNDS):
                await request((i + round_) % kinds)

        async def request(kind: int) -> None:
            try:
                if kind == 0:
                    response = await client.get(f"/v1/fine_tuning/jobs/{job_id}/events")
                elif kind == 1:
                    response = await client.get("/v1/fine_tuning/jobs", params={"limit": 5})
                elif kind == 2:
                    response = await client.get("/v1/files")
                elif kind == 3:
                    response = await client.get(f"/v1/fine_tuning/jobs/{job_id}")
                else:
                    response = await client.post("/v1/fine_tuning/jobs", json=create)
            except httpx.HTTPError as exc:
                failures.append(f"{kind}: {type(exc).__name__}: {exc}")
                return
            statuses[response.status_code] += 1
            if response.status_code != 200:
                failures.append(f"{kind}: {response.status_code} {response.text[:300]}")

        await asyncio.gather(*(one(i) for i in range(CONCURRENT)))
    return statuses, failures


def test_200_concurrent_clients_get_no_server_error(loaded_server: Server, chat_jsonl: str) -> None:
    server = loaded_server
    project = admin_request(server, "POST", "/v1/admin/projects", ADMIN_KEY, json={"name": "load"})
    key = admin_request(server, "POST", f"/v1/admin/projects/{project['id']}/api_keys", ADMIN_KEY)["value"]
    headers = {"Authorization": f"Bearer {key}"}
    file_id = httpx.post(
        server.base_url + "/v1/files",
        files={"file": ("qa.jsonl", chat_jsonl.encode())},
        data={"purpose": "fine-tune"},
        headers=headers,
        timeout=60,
    ).json()["id"]
    first = httpx.post(
        server.base_url + "/v1/fine_tuning/jobs",
        json={"model": "tuneforge/tiny-chat", "training_file": file_id},
        headers=headers,
        timeout=300,  # the first creation may build tiny-chat for the job's estimate
    )
    assert first.status_code == 200, first.text

    for kinds in (4, 4, 5):  # reads only, twice, then reads and job creations
        statuses, failures = asyncio.run(_burst(server, key, first.json()["id"], file_id, kinds))
        assert not failures, (kinds, statuses, failures[:10])
        assert statuses == Counter({200: CONCURRENT * ROUNDS})
    assert "QueuePool limit" not in server.log()


def test_sqlite_requests_never_wait_for_a_pooled_connection(tmp_path: Path) -> None:
    """A request holds its connection while it waits for a thread: a bounded SQLite pool lets
    threads waiting for connections and connections waiting for threads stall each other."""
    engine = make_engine(f"sqlite:///{tmp_path / 'pool.db'}", pool_size=1, max_overflow=0)
    try:
        held = [engine.connect() for _ in range(2 * CONCURRENT)]
        assert all(c.exec_driver_sql("SELECT 1").scalar() == 1 for c in held)
        for connection in held:
            connection.close()
    finally:
        engine.dispose()
