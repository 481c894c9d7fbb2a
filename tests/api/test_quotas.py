"""Per-project quotas and per-key rate limits, through the official SDK (max_retries=0) and raw
HTTP, on SQLite and PostgreSQL: unfinished jobs (429, not retried), stored bytes (413), requests
per key (429 with Retry-After), and the administrator's ceilings on planned steps and hours."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.api.conftest import ProjectCtx, new_project
from tuneforge.api.quotas import active_jobs
from tuneforge.config import Settings
from tuneforge.db import session_scope
from tuneforge.estimates.ceilings import OverCeiling, check_ceilings
from tuneforge.estimates.schema import FileStats
from tuneforge.models.spec import JobSpec

MODEL = "tuneforge/tiny-chat"


@pytest.fixture(scope="module")
def limited(settings: Settings) -> Iterator[tuple[FastAPI, TestClient]]:
    """An app on the suite's database with small quotas (the suite's own app has none)."""
    from tuneforge.api.app import create_app

    app = create_app(
        settings.model_copy(
            update={
                "max_active_jobs_per_project": 3,
                "max_stored_bytes_per_project": 30_000,
                "max_job_steps": 40,
            }
        )
    )
    with TestClient(app, raise_server_exceptions=False) as client:
        yield app, client
    app.state.engine.dispose()


def _job_body(file_id: str, **hyperparameters: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "training_file": file_id,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
    }


def test_active_job_quota_is_a_429_the_sdk_does_not_retry(
    limited: tuple[FastAPI, TestClient], chat_jsonl: str
) -> None:
    _, client = limited
    project = new_project(client, "quota")
    file_id = project.upload(chat_jsonl)
    created = [project.openai.fine_tuning.jobs.create(model=MODEL, training_file=file_id) for _ in range(3)]

    with pytest.raises(openai.RateLimitError) as caught:
        project.openai.fine_tuning.jobs.create(model=MODEL, training_file=file_id)
    error = caught.value
    assert error.status_code == 429
    assert error.code == "rate_limit_exceeded"
    assert error.response.headers["x-should-retry"] == "false"
    assert "maximum of 3 active or queued" in error.message

    other = new_project(client, "quota-other")  # another project has its own quota
    other.openai.fine_tuning.jobs.create(model=MODEL, training_file=other.upload(chat_jsonl))

    project.openai.fine_tuning.jobs.cancel(created[0].id)  # a finished job frees its place
    project.openai.fine_tuning.jobs.create(model=MODEL, training_file=file_id)


def test_racing_creations_never_pass_the_quota(limited: tuple[FastAPI, TestClient], chat_jsonl: str) -> None:
    """Twelve creations at once for a quota of 3: exactly 3 succeed, on both backends (the
    project row's lock makes the count and the insert one step)."""
    app, client = limited
    project = new_project(client, "race")
    body = _job_body(project.upload(chat_jsonl))
    barrier = threading.Barrier(12)
    statuses: list[int] = []

    def create() -> None:
        barrier.wait(timeout=60)
        statuses.append(client.post("/v1/fine_tuning/jobs", json=body, headers=project.headers).status_code)

    threads = [threading.Thread(target=create) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(statuses) == [200] * 3 + [429] * 9
    with session_scope(app.state.sessionmaker) as session:
        assert active_jobs(session, project.id) == 3


def test_storage_quota_is_a_413_and_deleting_makes_room(limited: tuple[FastAPI, TestClient]) -> None:
    _, client = limited
    project = new_project(client, "storage")
    line = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "%s"}]}\n'
    data = "".join(line % ("x" * 80) for _ in range(80))  # 13,440 bytes: two fit in 30,000
    first = project.upload(data)
    project.upload(data)
    with pytest.raises(openai.APIStatusError) as caught:
        project.upload(data)
    assert caught.value.status_code == 413
    assert caught.value.code == "storage_quota_exceeded"
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert len(project.openai.files.list().data) == 2  # the refused upload left nothing behind

    project.openai.files.delete(first)
    project.upload(data)


def test_a_billion_steps_is_refused_naming_the_field(project: ProjectCtx, chat_jsonl: str) -> None:
    """The default ceiling (a million steps) applies without any setting."""
    body = _job_body(project.upload(chat_jsonl), max_steps=1_000_000_000)
    response = project.client.post("/v1/fine_tuning/jobs", json=body, headers=project.headers)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "method.supervised.hyperparameters.max_steps"
    assert error["code"] == "job_over_ceiling"


def test_epochs_past_the_step_ceiling_are_refused(
    limited: tuple[FastAPI, TestClient], chat_jsonl: str
) -> None:
    _, client = limited
    project = new_project(client, "ceiling")
    file_id = project.upload(chat_jsonl)
    body = _job_body(file_id, n_epochs=50, batch_size=1)  # 32 examples: 1,600 steps, over 40
    response = client.post("/v1/fine_tuning/jobs", json=body, headers=project.headers)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "method.supervised.hyperparameters.n_epochs"
    ok = client.post("/v1/fine_tuning/jobs", json=_job_body(file_id, max_steps=40), headers=project.headers)
    assert ok.status_code == 200, ok.text


def test_hours_ceiling_uses_the_estimate(settings: Settings) -> None:
    spec = JobSpec.model_validate(_job_body("file-x", n_epochs=3))
    hours = settings.model_copy(update={"max_job_hours": 2.0})
    check_ceilings(spec, FileStats(examples=10), {"steps": 9, "estimated_seconds": 7000.0}, hours)
    with pytest.raises(OverCeiling) as caught:
        check_ceilings(spec, FileStats(examples=10), {"steps": 9, "estimated_seconds": 7300.0}, hours)
    assert caught.value.param == "method.supervised.hyperparameters.n_epochs"


@pytest.fixture(scope="module")
def rate_limited(settings: Settings) -> Iterator[TestClient]:
    from tuneforge.api.app import create_app

    app = create_app(settings.model_copy(update={"rate_limit_per_minute": 1.0, "rate_limit_burst": 3}))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client
    app.state.engine.dispose()


def test_request_rate_per_key(rate_limited: TestClient) -> None:
    """Three requests at once, then one a minute (a slow machine cannot refill the bucket during
    the test); the fourth at once is a 429 with Retry-After, and another key is not slowed by it.
    Estimates count like any request."""
    project = new_project(rate_limited, "rate")
    other = new_project(rate_limited, "rate-other")
    for _ in range(3):
        project.openai.fine_tuning.jobs.list()
    with pytest.raises(openai.RateLimitError) as caught:
        project.openai.fine_tuning.jobs.list()
    error = caught.value
    assert error.code == "rate_limit_exceeded"
    assert error.body is not None and error.body["type"] == "requests"  # type: ignore[index]
    assert 1 <= int(error.response.headers["retry-after"]) <= 60
    estimate = rate_limited.post("/v1/fine_tuning/estimates", json={"model": MODEL}, headers=project.headers)
    assert estimate.status_code == 429
    respelled = {"Authorization": f"bearer   {project.key} "}  # the same key, however it is written
    assert rate_limited.get("/v1/fine_tuning/jobs", headers=respelled).status_code == 429
    other.openai.fine_tuning.jobs.list()
