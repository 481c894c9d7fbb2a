"""Requests whose session spans two thread hops (a dependency's query, then the route's) on a
bounded PostgreSQL pool. With more of them in flight than connections, the requests holding every
connection while they wait for a thread and the threads waiting for a connection stalled each
other until the pool's timeout: seen as 30 s stalls and 503s under 200 clients against
`tuneforge serve` (tests/api/test_embedded_load.py). Here the pool has 3 connections and the API
1 thread, so a dozen concurrent deletes stall at once without the bound on sessions
(tuneforge.db.session_slots); the pool's timeout is cut to 5 s so that a stall fails fast."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import Engine, create_engine

import tuneforge.api.app as app_module
from tests.support import pg_database
from tests.support.api import ADMIN_KEY
from tuneforge.config import Settings

from .conftest import TEST_BROKER

POOL, OVERFLOW, THREADS, REQUESTS = 2, 1, 1, 12


def test_two_hop_requests_beyond_the_pool_wait_for_a_slot_not_the_pool_timeout(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, chat_jsonl: str
) -> None:
    def small_engine(url: str) -> Engine:
        return create_engine(url, pool_size=POOL, max_overflow=OVERFLOW, pool_timeout=5, pool_pre_ping=True)

    monkeypatch.setattr(app_module, "make_engine", small_engine)
    with pg_database("tf_slots") as url:
        settings = Settings(
            data_dir=tmp_path,
            database_url=url,
            broker_url=TEST_BROKER,
            admin_key=ADMIN_KEY,  # type: ignore[arg-type]
            api_threads=THREADS,
        )
        app = app_module.create_app(settings)
        try:
            statuses, failures = asyncio.run(_concurrent_deletes(app, chat_jsonl))
        finally:
            app.state.engine.dispose()
    assert statuses == Counter({200: REQUESTS}), failures[:3]


async def _concurrent_deletes(app: FastAPI, chat_jsonl: str) -> tuple[Counter[int], list[str]]:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as client,
    ):
        project = (await client.post("/v1/admin/projects", json={"name": "slots"}, headers=admin)).json()
        created = await client.post(f"/v1/admin/projects/{project['id']}/api_keys", headers=admin)
        headers = {"Authorization": f"Bearer {created.json()['value']}"}
        ids = []
        for _ in range(REQUESTS):
            upload = await client.post(
                "/v1/files",
                files={"file": ("qa.jsonl", chat_jsonl.encode())},
                data={"purpose": "fine-tune"},
                headers=headers,
            )
            assert upload.status_code == 200, upload.text
            ids.append(upload.json()["id"])
        # DELETE /v1/files/{id}: load_file in one thread, the route in the next, one transaction.
        answers = await asyncio.gather(*(client.delete(f"/v1/files/{i}", headers=headers) for i in ids))
    return Counter(a.status_code for a in answers), [a.text for a in answers if a.status_code != 200]
