"""Webhook deliveries and live event streams on a real stack: `tuneforge serve`, a `tuneforge
worker` (the stand-in training runner: the plumbing is under test, not the training), `tuneforge
beat` (which sends the deliveries), PostgreSQL (LISTEN/NOTIFY wakes the streams) and Redis, driven
with the official SDK; a receiver on 127.0.0.1 (allowed by TUNEFORGE_WEBHOOK_ALLOW_HOSTS).

One module-scoped stack and three jobs serve every test: one succeeds (streamed live from its
creation), one fails (the stand-in crashes at step 7) and one is cancelled. Jobs that name queue
`idle` (TUNEFORGE_JOB_QUEUES), which no worker consumes, wait for as long as a test needs."""

from __future__ import annotations

import json
import subprocess
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.support import free_port, wait_for
from tests.support.receiver import Received, Receiver, start_receiver
from tests.support.server import wait_healthy
from tests.worker.procs import Services, running_services

pytestmark = pytest.mark.slow

ALL_EVENTS = ["fine_tuning.job.succeeded", "fine_tuning.job.failed", "fine_tuning.job.cancelled"]
TERMINAL = {"succeeded", "failed", "cancelled"}
HEARTBEAT_SECONDS = 1.0


@dataclass
class Stack:
    services: Services
    base_url: str
    key: str
    receiver: Receiver
    beat: subprocess.Popen[bytes]

    def sdk(self) -> OpenAI:
        return OpenAI(base_url=self.base_url + "/v1", api_key=self.key, max_retries=2, timeout=60)

    def get(self, path: str, **headers: str) -> httpx.Response:
        return httpx.get(
            self.base_url + path, headers={"Authorization": f"Bearer {self.key}", **headers}, timeout=30
        )


@pytest.fixture(scope="module")
def stack(
    pg_url: str,
    redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
    models_dir: Path,
    tiny_chat_path: Path,
) -> Iterator[Stack]:
    key = "tf-admin-" + uuid.uuid4().hex
    env = {
        "TUNEFORGE_ADMIN_KEY": key,
        "TUNEFORGE_WEBHOOK_ALLOW_HOSTS": "127.0.0.1",
        "TUNEFORGE_WEBHOOK_RETRY_SECONDS": "0.3,0.3,0.3,0.3",
        "TUNEFORGE_WEBHOOK_SEND_EVERY_SECONDS": "0.5",
        "TUNEFORGE_EVENT_STREAM_HEARTBEAT_SECONDS": str(HEARTBEAT_SECONDS),
        "TUNEFORGE_JOB_QUEUES": "idle",
        "STANDIN_CRASH_AT": "7",
        "STANDIN_STEP_SECONDS": "0.2",
    }
    receiver = start_receiver()
    port = free_port()
    with running_services(tmp_path_factory.mktemp("webhooks"), pg_url, redis_url, models_dir, env) as svc:
        serve = svc.start("serve", "--port", str(port), name="serve")
        svc.worker(concurrency=2)
        beat = svc.beat()
        base_url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(base_url, serve, 90, svc.tmp / "serve-0.log")
            yield Stack(svc, base_url, key, receiver, beat)
        finally:
            receiver.close()


def _events(text: str) -> list[dict[str, Any]]:
    events = []
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if line and not line.startswith(":"))
        if "data" in fields:
            event = json.loads(fields["data"])
            assert fields["id"] == event["id"]
            events.append(event)
    return events


@contextmanager
def _open_stream(stack: Stack, job_id: str, **headers: str) -> Iterator[Iterator[str]]:
    """The lines of the job's live stream (blank lines end each message), as they arrive."""
    url = f"{stack.base_url}/v1/fine_tuning/jobs/{job_id}/events?stream=true"
    auth = {"Authorization": f"Bearer {stack.key}", **headers}
    with httpx.stream("GET", url, headers=auth, timeout=httpx.Timeout(30, read=30)) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        yield response.iter_lines()


def _stream(stack: Stack, job_id: str, **headers: str) -> tuple[list[dict[str, Any]], str]:
    """The whole stream of the job, read until the server ends it."""
    with _open_stream(stack, job_id, **headers) as lines:
        text = "".join(line + "\n" for line in lines)
    return _events(text), text


@dataclass
class Jobs:
    succeeded: str
    failed: str
    cancelled: str
    endpoint_ok: str
    endpoint_flaky: str
    secret_ok: str
    secret_flaky: str
    streamed: list[dict[str, Any]]
    stream_text: str


@pytest.fixture(scope="module")
def jobs(stack: Stack, qa_path: Path) -> Jobs:
    """Two endpoints (one answers 200, one 500 twice then 200), three jobs run to their end, and
    the live stream of the one that succeeds, opened right after its creation."""
    sdk = stack.sdk()
    tag = uuid.uuid4().hex[:8]
    ok = sdk.webhooks.create(name="ok", url=stack.receiver.url(f"/ok-{tag}"), event_types=ALL_EVENTS)  # type: ignore[list-item]
    flaky = sdk.webhooks.create(
        name="flaky",
        url=stack.receiver.url(f"/flaky-{tag}", 500, 500, 200),
        event_types=["fine_tuning.job.succeeded"],
    )
    training_file = sdk.files.create(file=qa_path.open("rb"), purpose="fine-tune").id

    def create(max_steps: int) -> str:
        method = {"type": "supervised", "supervised": {"hyperparameters": {"max_steps": max_steps}}}
        return sdk.fine_tuning.jobs.create(
            model="tuneforge/tiny-chat",
            training_file=training_file,
            method=method,  # type: ignore[arg-type]
        ).id

    succeeded = create(5)
    streamed: dict[str, Any] = {}

    def watch() -> None:
        streamed["events"], streamed["text"] = _stream(stack, succeeded)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    failed = create(10)
    cancelled = create(5)
    sdk.fine_tuning.jobs.cancel(cancelled)

    def finished() -> bool:
        return all(sdk.fine_tuning.jobs.retrieve(j).status in TERMINAL for j in (succeeded, failed))

    wait_for(finished, 120, "the jobs to finish", stack.services)
    watcher.join(timeout=30)
    assert "events" in streamed, "the live stream did not end with the job"
    return Jobs(
        succeeded,
        failed,
        cancelled,
        ok.id,
        flaky.id,
        ok.signing_secret,
        flaky.signing_secret,
        streamed["events"],
        streamed["text"],
    )


def _received(stack: Stack, endpoint_id: str, count: int) -> list[Received]:
    path = "/" + stack.sdk().webhooks.retrieve(endpoint_id).url.split("/", 3)[3]
    return list(
        wait_for(
            lambda: (got := stack.receiver.received(path)) and len(got) >= count and got,
            30,
            f"{count} deliveries to {path}",
            stack.services,
        )
    )


def test_each_final_status_is_delivered_signed(stack: Stack, jobs: Jobs) -> None:
    sdk = stack.sdk()
    assert sdk.fine_tuning.jobs.retrieve(jobs.succeeded).status == "succeeded"
    assert sdk.fine_tuning.jobs.retrieve(jobs.failed).status == "failed"
    assert sdk.fine_tuning.jobs.retrieve(jobs.cancelled).status == "cancelled"
    ours = {jobs.succeeded, jobs.failed, jobs.cancelled}  # other tests' jobs are delivered here too

    def delivered() -> Any:
        path = "/" + sdk.webhooks.retrieve(jobs.endpoint_ok).url.split("/", 3)[3]
        unwrapped = [
            sdk.webhooks.unwrap(r.body, r.headers, secret=jobs.secret_ok)
            for r in stack.receiver.received(path)
        ]
        events = [e for e in unwrapped if e.data.id in ours]
        return events if len(events) >= 3 else None

    events = wait_for(delivered, 30, "the three jobs' deliveries", stack.services)
    assert sorted((e.type, e.data.id) for e in events) == sorted(
        [
            ("fine_tuning.job.succeeded", jobs.succeeded),
            ("fine_tuning.job.failed", jobs.failed),
            ("fine_tuning.job.cancelled", jobs.cancelled),
        ]
    )
    assert all(e.object == "event" and e.id.startswith("evt_") for e in events)


def test_a_failing_receiver_gets_the_same_webhook_id_until_it_answers_200(stack: Stack, jobs: Jobs) -> None:
    sdk = stack.sdk()
    attempts = _received(stack, jobs.endpoint_flaky, 3)
    assert len({r.headers["webhook-id"] for r in attempts}) == 1
    for attempt in attempts:  # each attempt signed afresh, each verifies
        event = sdk.webhooks.unwrap(attempt.body, attempt.headers, secret=jobs.secret_flaky)
        assert (event.type, event.data.id) == ("fine_tuning.job.succeeded", jobs.succeeded)

    def delivered() -> Any:
        [row] = stack.get(f"/v1/webhook_endpoints/{jobs.endpoint_flaky}/deliveries").json()["data"]
        return row if row["status"] == "delivered" else None

    row = wait_for(delivered, 15, "the delivery to be recorded", stack.services)
    assert (row["id"], row["attempts"], row["last_status_code"]) == (
        attempts[0].headers["webhook-id"],
        3,
        200,
    )


def test_the_live_stream_sends_every_event_in_order_and_resumes_after_last_event_id(
    stack: Stack, jobs: Jobs
) -> None:
    listed = [
        e.model_dump() for e in stack.sdk().fine_tuning.jobs.list_events(jobs.succeeded, limit=1000).data
    ]
    listed.reverse()  # list_events is newest first; the stream oldest first
    assert [e["id"] for e in jobs.streamed] == [e["id"] for e in listed]
    assert any(e["type"] == "metrics" for e in jobs.streamed)
    assert [(e["type"], e["message"], e["data"]) for e in jobs.streamed] == [
        (e["type"], e["message"], e["data"]) for e in listed
    ]

    middle = len(listed) // 2
    rest, _ = _stream(stack, jobs.succeeded, **{"Last-Event-ID": listed[middle]["id"]})
    assert rest == jobs.streamed[middle + 1 :]


def test_a_stream_held_open_on_a_waiting_job_sends_heartbeats_and_ends_with_the_job(
    stack: Stack, qa_path: Path
) -> None:
    """A job on a queue no worker consumes waits (no worker checks its files either) and writes no
    event after its first ones: its stream stays open, carries a heartbeat comment every
    TUNEFORGE_EVENT_STREAM_HEARTBEAT_SECONDS, and ends with the job's cancellation, having sent
    every event once, in order."""
    sdk = stack.sdk()
    training_file = sdk.files.create(file=qa_path.open("rb"), purpose="fine-tune").id
    job = sdk.fine_tuning.jobs.create(
        model="tuneforge/tiny-chat", training_file=training_file, extra_body={"queue": "idle"}
    )
    seen: list[str] = []
    with _open_stream(stack, job.id) as lines:
        for line in lines:  # the read timeout (30 s) fails the test if no heartbeat comes
            seen.append(line)
            if seen.count(": ping") == 3:
                break
        assert sdk.fine_tuning.jobs.retrieve(job.id).status not in TERMINAL
        sdk.fine_tuning.jobs.cancel(job.id)
        seen += list(lines)  # the stream ends by itself once the job is final
    streamed = _events("".join(line + "\n" for line in seen))
    listed = [e.model_dump() for e in sdk.fine_tuning.jobs.list_events(job.id, limit=1000).data][::-1]
    assert [e["id"] for e in streamed] == [e["id"] for e in listed]
    assert streamed[-1]["message"] == listed[-1]["message"]
    assert "cancel" in streamed[-1]["message"].lower(), streamed[-1]


def test_a_delivery_written_while_the_sender_is_down_is_sent_when_it_is_back(
    stack: Stack, jobs: Jobs, qa_path: Path
) -> None:
    """The outbox outlives the beat process: a job cancelled while no sender runs is delivered
    by the next one."""
    sdk = stack.sdk()
    path = f"/later-{uuid.uuid4().hex[:8]}"
    endpoint = sdk.webhooks.create(
        name="later", url=stack.receiver.url(path), event_types=["fine_tuning.job.cancelled"]
    )
    stack.services.stop(stack.beat)
    training_file = sdk.files.create(file=qa_path.open("rb"), purpose="fine-tune").id
    job = sdk.fine_tuning.jobs.create(model="tuneforge/tiny-chat", training_file=training_file)
    sdk.fine_tuning.jobs.cancel(job.id)
    [pending] = stack.get(f"/v1/webhook_endpoints/{endpoint.id}/deliveries").json()["data"]
    assert (pending["status"], pending["attempts"]) == ("pending", 0)
    stack.beat = stack.services.beat()
    [received] = _received(stack, endpoint.id, 1)
    event = sdk.webhooks.unwrap(received.body, received.headers, secret=endpoint.signing_secret)
    assert (event.type, event.data.id, received.headers["webhook-id"]) == (
        "fine_tuning.job.cancelled",
        job.id,
        pending["id"],
    )
