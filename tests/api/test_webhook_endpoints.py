"""Webhook endpoints through the official SDK (`client.webhooks.*`), the URL policy, the test
delivery (signed so that `client.webhooks.unwrap` verifies it), the outbox row a final status
writes, and the live event stream of a finished job. No worker runs here (tests/webhooks has
the stack that delivers)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.api.test_openapi import Conformance
from tests.support import wait_for
from tests.support.api import ProjectCtx
from tests.support.receiver import Receiver, start_receiver

SUCCEEDED = "fine_tuning.job.succeeded"


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    server = start_receiver()
    yield server
    server.close()


@pytest.fixture
def allow_local(app: FastAPI, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app.state.settings, "webhook_allow_hosts", "127.0.0.1")


def _error(response: Any) -> dict[str, Any]:
    assert response.status_code == 400, response.text
    error: dict[str, Any] = response.json()["error"]
    return error


def test_endpoint_lifecycle_through_the_sdk(
    project: ProjectCtx, other_project: ProjectCtx, receiver: Receiver, allow_local: None
) -> None:
    sdk = project.openai
    created = sdk.webhooks.create(name="ci", url=receiver.url(f"/life-{project.id}"), event_types=[SUCCEEDED])
    assert created.id.startswith("we_") and created.object == "webhook_endpoint"
    secret = created.signing_secret
    assert secret.startswith("whsec_") and created.signing_secret_hint == f"whsec_...{secret[-4:]}"

    shown = project.client.get(f"/v1/webhook_endpoints/{created.id}", headers=project.headers).json()
    assert "signing_secret" not in shown and shown["signing_secret_hint"] == created.signing_secret_hint
    assert [e.id for e in sdk.webhooks.list()] == [created.id]
    assert sdk.webhooks.event_types.list().data == [
        SUCCEEDED,
        "fine_tuning.job.failed",
        "fine_tuning.job.cancelled",
    ]

    updated = sdk.webhooks.update(created.id, name="ci-2", event_types=[SUCCEEDED, "fine_tuning.job.failed"])
    assert (updated.name, updated.event_types) == ("ci-2", [SUCCEEDED, "fine_tuning.job.failed"])
    # the secret is never shown again: neither in the list nor in an update's answer
    listed = project.client.get("/v1/webhook_endpoints", headers=project.headers).json()["data"]
    changed = project.client.post(
        f"/v1/webhook_endpoints/{created.id}", json={"name": "ci-2"}, headers=project.headers
    ).json()
    for answer in (*listed, changed):
        assert "signing_secret" not in answer and answer["signing_secret_hint"] == created.signing_secret_hint

    result = sdk.webhooks.test(created.id, event_type="fine_tuning.job.failed")
    assert (result.status_code, result.success, result.webhook_endpoint_id) == (200, True, created.id)
    [sent] = receiver.received(f"/life-{project.id}")
    event = sdk.webhooks.unwrap(sent.body, sent.headers, secret=secret)
    assert event.type == "fine_tuning.job.failed" and event.object == "event"

    rotated = sdk.webhooks.rotate_secret(created.id)
    assert rotated.signing_secret != secret
    sdk.webhooks.test(created.id, event_type=SUCCEEDED)
    second = receiver.received(f"/life-{project.id}")[1]
    sdk.webhooks.unwrap(second.body, second.headers, secret=rotated.signing_secret)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        sdk.webhooks.unwrap(second.body, second.headers, secret=secret)

    kept = sdk.webhooks.rotate_secret(created.id, keep_old_secret_active_for_24_hours=True)
    sdk.webhooks.test(created.id, event_type=SUCCEEDED)
    third = receiver.received(f"/life-{project.id}")[2]
    for valid in (kept.signing_secret, rotated.signing_secret):
        sdk.webhooks.unwrap(third.body, third.headers, secret=valid)

    deliveries = project.client.get(
        f"/v1/webhook_endpoints/{created.id}/deliveries", headers=project.headers
    ).json()["data"]
    assert [d["status"] for d in deliveries] == ["delivered"] * 3
    assert {d["id"] for d in deliveries} == {
        r.headers["webhook-id"] for r in receiver.received(f"/life-{project.id}")
    }

    with pytest.raises(openai.NotFoundError):
        other_project.openai.webhooks.retrieve(created.id)
    assert sdk.webhooks.delete(created.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        sdk.webhooks.retrieve(created.id)


@pytest.mark.parametrize(
    "url",
    [
        "http://hooks.example.com/x",  # plain http to a host nobody allowed
        "https://10.1.2.3/x",
        "https://169.254.169.254/latest/meta-data",
        "https://127.0.0.1:8443/x",
        "https://[::1]/x",
        "https://localhost/x",
        "https://user:pw@example.com/x",
        "ftp://example.com/x",
        "not a url",
    ],
)
def test_refused_urls(project: ProjectCtx, url: str) -> None:
    body = {"name": "n", "url": url, "event_types": [SUCCEEDED]}
    error = _error(project.client.post("/v1/webhook_endpoints", json=body, headers=project.headers))
    assert error["param"] == "url", error


def test_refused_bodies(project: ProjectCtx, receiver: Receiver, allow_local: None) -> None:
    post = project.client.post
    url = receiver.url(f"/refused-{project.id}")
    for event_types, param in ((["batch.completed"], "event_types[0]"), ([], "event_types")):
        body = {"name": "n", "url": url, "event_types": event_types}
        assert _error(post("/v1/webhook_endpoints", json=body, headers=project.headers))["param"] == param
    made = project.openai.webhooks.create(name="n", url=url, event_types=[SUCCEEDED])
    test = post(f"/v1/webhook_endpoints/{made.id}/test", json={"event_type": "x"}, headers=project.headers)
    assert _error(test)["param"] == "event_type"
    update = post(
        f"/v1/webhook_endpoints/{made.id}", json={"url": "https://10.0.0.1/"}, headers=project.headers
    )
    assert _error(update)["param"] == "url"


def test_redirects_are_not_followed(project: ProjectCtx, receiver: Receiver, allow_local: None) -> None:
    made = project.openai.webhooks.create(
        name="r", url=receiver.url(f"/moved-{project.id}", 302), event_types=[SUCCEEDED]
    )
    assert project.openai.webhooks.test(made.id, event_type=SUCCEEDED).status_code == 302
    assert receiver.received("/redirected") == []
    [delivery] = project.client.get(
        f"/v1/webhook_endpoints/{made.id}/deliveries", headers=project.headers
    ).json()["data"]
    assert (delivery["status"], delivery["last_status_code"]) == ("failed", 302)


def _stream(project: ProjectCtx, job_id: str, last_event_id: str | None = None) -> list[dict[str, Any]]:
    headers = dict(project.headers)
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    url = f"/v1/fine_tuning/jobs/{job_id}/events?stream=true"
    with project.client.stream("GET", url, headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        text = "".join(response.iter_text())
    events = []
    for block in text.split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        if "data" in lines:
            event = json.loads(lines["data"])
            assert lines["id"] == event["id"]
            events.append(event)
    return events


def test_a_final_status_writes_the_outbox_row_and_ends_the_stream(
    project: ProjectCtx, receiver: Receiver, allow_local: None, chat_jsonl: str
) -> None:
    """Cancelling a job (in the API's transaction) leaves a pending delivery of
    `fine_tuning.job.cancelled` for the sender; the finished job's stream sends every event
    `list_events` shows, oldest first, then ends; a reconnect resumes after Last-Event-ID."""
    sdk = project.openai
    made = sdk.webhooks.create(
        name="c", url=receiver.url(f"/cancelled-{project.id}"), event_types=["fine_tuning.job.cancelled"]
    )
    job = sdk.fine_tuning.jobs.create(model="tuneforge/tiny-chat", training_file=project.upload(chat_jsonl))
    sdk.fine_tuning.jobs.cancel(job.id)
    [delivery] = project.client.get(
        f"/v1/webhook_endpoints/{made.id}/deliveries", headers=project.headers
    ).json()["data"]
    assert (delivery["status"], delivery["attempts"]) == ("pending", 0)
    assert delivery["event"]["type"] == "fine_tuning.job.cancelled"
    assert delivery["event"]["data"] == {"id": job.id}
    created_at = delivery["event"]["created_at"]  # when the status changed, as OpenAI's events have it
    assert isinstance(created_at, int) and job.created_at <= created_at <= time.time() + 1

    listed = [e.model_dump() for e in sdk.fine_tuning.jobs.list_events(job.id, limit=100).data][::-1]
    streamed = _stream(project, job.id)
    assert [e["id"] for e in streamed] == [e["id"] for e in listed] and len(listed) >= 2
    assert _stream(project, job.id, last_event_id=listed[0]["id"]) == streamed[1:]
    bad = project.client.get(
        f"/v1/fine_tuning/jobs/{job.id}/events?stream=true",
        headers={**project.headers, "Last-Event-ID": "ftevent-nope"},
    )
    assert _error(bad)["param"] == "Last-Event-ID"


def test_answers_conform_to_the_document(
    client: TestClient, project: ProjectCtx, receiver: Receiver, allow_local: None
) -> None:
    check, key = Conformance(client), project.key
    base, one = "/v1/webhook_endpoints", "/v1/webhook_endpoints/{webhook_endpoint_id}"
    body = {"name": "doc", "url": receiver.url(f"/doc-{project.id}"), "event_types": [SUCCEEDED]}
    made = check("POST", base, base, key, json=body)
    check("POST", base, base, key, json={**body, "url": "http://example.com/"})
    path = f"{base}/{made['id']}"
    check("GET", base, base, key, params={"limit": 1})
    check("GET", one, path, key)
    check("GET", one, f"{base}/we_nothing", key)
    check("POST", one, path, key, json={"name": "doc-2"})
    check("POST", one + "/rotate_secret", path + "/rotate_secret", key, json={})
    check("POST", one + "/test", path + "/test", key, json={"event_type": SUCCEEDED})
    check("GET", one + "/deliveries", path + "/deliveries", key)
    check("GET", "/v1/webhook_event_types", "/v1/webhook_event_types", key)
    check("DELETE", one, path, key)


def test_a_live_stream_follows_a_job_until_its_final_status(
    app: FastAPI, project: ProjectCtx, chat_jsonl: str
) -> None:
    """Opened before the events are written (PostgreSQL: woken by NOTIFY; SQLite: polling), the
    stream sends each event as it is committed and ends with the final status."""
    from tuneforge.db import session_scope
    from tuneforge.models import job as jobs

    job = project.openai.fine_tuning.jobs.create(
        model="tuneforge/tiny-chat", training_file=project.upload(chat_jsonl)
    )
    streamed: dict[str, list[dict[str, Any]]] = {}
    watcher = threading.Thread(target=lambda: streamed.update(events=_stream(project, job.id)), daemon=True)
    watcher.start()
    wait_for(
        lambda: getattr(app.state, "job_event_bus", None) and app.state.job_event_bus.subscribers,
        30,
        "the stream to open",
    )
    for step in (1, 2, 3):
        with session_scope(app.state.sessionmaker) as session:
            jobs.append_events(session, job.id, [jobs.EventRecord(f"step {step}", type="metrics")])
    with session_scope(app.state.sessionmaker) as session:
        assert jobs.transition(
            session, job.id, jobs.JobStatus.CANCELLED, events=[jobs.EventRecord("Job cancelled.")]
        )
    watcher.join(timeout=30)
    listed = [e.id for e in project.openai.fine_tuning.jobs.list_events(job.id, limit=100).data][::-1]
    assert [e["id"] for e in streamed["events"]] == listed
    assert [e["message"] for e in streamed["events"]][-4:] == ["step 1", "step 2", "step 3", "Job cancelled."]


def test_endpoints_and_deliveries_page_with_after_and_limit(
    project: ProjectCtx, receiver: Receiver, allow_local: None
) -> None:
    """The jobs routes' paging (tuneforge/api/paging.py): newest first, `has_more`, `after` an id of
    the list; an id that is not one is a 400 naming `after`."""
    made = [
        project.openai.webhooks.create(
            name=f"p{i}", url=receiver.url(f"/page-{i}"), event_types=[SUCCEEDED]
        ).id
        for i in range(3)
    ]
    base = "/v1/webhook_endpoints"
    first = project.client.get(base, params={"limit": 2}, headers=project.headers).json()
    assert [e["id"] for e in first["data"]] == made[::-1][:2] and first["has_more"] is True
    rest = project.client.get(
        base, params={"limit": 2, "after": first["last_id"]}, headers=project.headers
    ).json()
    assert [e["id"] for e in rest["data"]] == made[:1] and rest["has_more"] is False

    for url in (f"{base}?after=we_nope", f"{base}/{made[0]}/deliveries?after=nope"):
        error = _error(project.client.get(url, headers=project.headers))
        assert error["param"] == "after" and "nope" in error["message"], (url, error)
    page = project.client.get(f"{base}/{made[0]}/deliveries", headers=project.headers).json()
    assert (page["data"], page["has_more"]) == ([], False)
