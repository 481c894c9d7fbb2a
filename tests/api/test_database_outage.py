"""A real `tuneforge serve` on a PostgreSQL cluster of the test's own while the database drops
its connections and restarts: no request is a 500; while the database is away the API answers
503 with `x-should-retry: true` in the OpenAI error shape; afterwards it answers again by itself.

Both read paths are driven: the psycopg pool behind the bearer-key check and the job GET (the
key cache is off, so every request checks its key in the database), and the SQLAlchemy pool
behind the listings."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.support import PgCluster, RedisServer, start_server, stop_server, wait_for
from tests.support.api import ADMIN_KEY, admin_request

pytestmark = pytest.mark.slow

PATHS = ("/v1/fine_tuning/jobs/ftjob-missing", "/v1/fine_tuning/jobs", "/v1/files")
EXPECTED_OK = {PATHS[0]: 404, PATHS[1]: 200, PATHS[2]: 200}


@dataclass
class Traffic:
    """Clients polling PATHS until stopped, recording every answer."""

    base_url: str
    key: str
    answers: Counter[tuple[str, int]] = field(default_factory=Counter)
    bad: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {self.key}"}
        with httpx.Client(base_url=self.base_url, headers=headers, timeout=60) as client:
            while not self.stop.is_set():
                for path in PATHS:
                    try:
                        response = client.get(path)
                    except httpx.HTTPError as exc:
                        self.bad.append(f"{path}: {type(exc).__name__}: {exc}")
                        continue
                    self.answers[(path, response.status_code)] += 1
                    if response.status_code == EXPECTED_OK[path]:
                        continue
                    error = response.json().get("error", {})
                    if (
                        response.status_code != 503
                        or response.headers.get("x-should-retry") != "true"
                        or set(error) != {"message", "type", "param", "code"}
                        or "SELECT" in error["message"]
                    ):
                        self.bad.append(f"{path}: {response.status_code} {response.headers} {response.text}")


def _all_answer(base_url: str, key: str) -> bool:
    headers = {"Authorization": f"Bearer {key}"}
    return all(
        httpx.get(base_url + path, headers=headers, timeout=60).status_code == EXPECTED_OK[path]
        for path in PATHS
    )


@pytest.fixture
def cluster() -> Iterator[PgCluster]:
    with PgCluster() as pg:  # in a temporary directory of its own, removed afterwards
        yield pg


def test_api_rides_out_dropped_connections_and_a_restart(
    cluster: PgCluster, tmp_path: Path, models_dir: Path
) -> None:
    url = cluster.create_database()
    with RedisServer() as broker:
        env = {
            "TUNEFORGE_DATABASE_URL": url,
            "TUNEFORGE_BROKER_URL": broker.url(),
            "TUNEFORGE_ADMIN_KEY": ADMIN_KEY,
            "TUNEFORGE_API_KEY_CACHE_SECONDS": "0",
        }
        server = start_server(env, tmp_path / "data")
        try:
            project = admin_request(server, "POST", "/v1/admin/projects", ADMIN_KEY, json={"name": "p"})
            key = admin_request(server, "POST", f"/v1/admin/projects/{project['id']}/api_keys", ADMIN_KEY)
            traffic = Traffic(server.base_url, key["value"])
            threads = [threading.Thread(target=traffic.run) for _ in range(4)]
            for thread in threads:
                thread.start()
            try:
                time.sleep(2)
                assert cluster.terminate_backends(url) > 0
                time.sleep(2)
                cluster.stop()
                wait_for(
                    lambda: {path for (path, status) in traffic.answers if status == 503} == set(PATHS),
                    120,
                    "a 503 on every path while the database is down",
                )
                ready = httpx.get(server.base_url + "/readyz", timeout=60)
                assert ready.status_code == 503
                assert ready.json()["checks"]["database"] == "unavailable", ready.text
                cluster.start()
                wait_for(lambda: _all_answer(server.base_url, key["value"]), 60, "answers after the restart")
                after = Counter(traffic.answers)
                time.sleep(3)
            finally:
                traffic.stop.set()
                for thread in threads:
                    thread.join(timeout=120)
            assert not traffic.bad, traffic.bad[:5]
            assert not any(status >= 500 and status != 503 for _, status in traffic.answers)
            recovered = traffic.answers - after
            assert recovered and all(status == EXPECTED_OK[path] for path, status in recovered), recovered
            assert httpx.get(server.base_url + "/readyz", timeout=60).status_code == 200
            assert "Traceback" not in server.log(), server.log()[-5000:]
        finally:
            stop_server(server)
