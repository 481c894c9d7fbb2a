"""Webhook deliveries and live event streams on a real stack: `tuneforge serve`, a `tuneforge
worker` (the stand-in training runner: the plumbing is under test, not the training), `tuneforge
beat` (which sends the deliveries and serves their counts on TUNEFORGE_BEAT_METRICS_PORT),
PostgreSQL (LISTEN/NOTIFY wakes the streams) and Redis, driven with the official SDK; a receiver
on 127.0.0.1 (allowed by TUNEFORGE_WEBHOOK_ALLOW_HOSTS).

One module-scoped stack and three jobs serve most tests: one succeeds (streamed live from its
creation), one fails (the stand-in crashes at step 7) and one is cancelled. Jobs that name queue
`idle` (TUNEFORGE_JOB_QUEUES), which no worker consumes, wait for as long as a test needs; queue
`long` is for a test that starts a worker whose stand-in does not crash. The last test stops and
starts the beat and the API."""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

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
    serve: subprocess.Popen[bytes]
    beat_metrics: str

    def start_serve(self) -> None:
        log = self.services.tmp / f"serve-{len(self.services.processes)}.log"
        self.serve = self.services.start("serve", "--port", self.base_url.rsplit(":", 1)[1], name="serve")
        wait_healthy(self.base_url, self.serve, 90, log)

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
        "TUNEFORGE_JOB_QUEUES": "idle,long",
        "STANDIN_CRASH_AT": "7",
        "STANDIN_STEP_SECONDS": "0.2",
    }
    beat_metrics_port = free_port()
    env["TUNEFORGE_BEAT_METRICS_PORT"] = str(beat_metrics_port)
    env["TUNEFORGE_WORKER_METRICS_HOST"] = "127.0.0.1"
    receiver = start_receiver()
    port = free_port()
    with running_services(tmp_path_factory.mktemp("webhooks"), pg_url, redis_url, models_dir, env) as svc:
        serve = svc.start("serve", "--port", str(port), name="serve")
        svc.worker(concurrency=2)
        beat = svc.beat()
        base_url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(base_url, serve, 90, svc.tmp / "serve-0.log")
            beat_metrics = f"http://127.0.0.1:{beat_metrics_port}/metrics"
            yield Stack(svc, base_url, key, receiver, beat, serve, beat_metrics)
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
    for event in events:  # created_at: when the final status was written, in whole seconds
        job = sdk.fine_tuning.jobs.retrieve(event.data.id)
        latest = job.finished_at if job.finished_at is not None else time.time()
        assert isinstance(event.created_at, int) and job.created_at <= event.created_at <= latest + 1, (
            event.created_at,
            job.created_at,
            job.finished_at,
        )


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

    # The beat, which sent them, counts the attempts by outcome on its /metrics (the flaky
    # endpoint's two 500s are retries; other tests' deliveries may add to the counts)
    counted = wait_for(
        lambda: (
            (got := _deliveries_counted(stack.beat_metrics))
            and got.get("retry", 0) >= 2
            and got.get("delivered", 0) >= 1
            and got
        ),
        15,
        "the beat's /metrics to count the attempts",
        stack.services,
    )
    assert set(counted) <= {"delivered", "retry", "gave_up"}, counted


def _deliveries_counted(url: str) -> dict[str, float]:
    """tuneforge_webhook_deliveries_total by outcome, as a /metrics page serves it."""
    answer = httpx.get(url, timeout=10)
    assert answer.status_code == 200, answer.text
    return {
        sample.labels["outcome"]: sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
        if sample.name == "tuneforge_webhook_deliveries_total"
    }


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


def _idle_job(stack: Stack, qa_path: Path) -> str:
    """A job on queue `idle`: it waits, writing no event after its first ones."""
    sdk = stack.sdk()
    training_file = sdk.files.create(file=qa_path.open("rb"), purpose="fine-tune").id
    return sdk.fine_tuning.jobs.create(
        model="tuneforge/tiny-chat", training_file=training_file, extra_body={"queue": "idle"}
    ).id


def test_a_stream_held_open_on_a_waiting_job_sends_heartbeats_and_ends_with_the_job(
    stack: Stack, qa_path: Path
) -> None:
    """A job on a queue no worker consumes waits (no worker checks its files either) and writes no
    event after its first ones: its stream stays open, carries a heartbeat comment every
    TUNEFORGE_EVENT_STREAM_HEARTBEAT_SECONDS, and ends with the job's cancellation, having sent
    every event once, in order."""
    sdk = stack.sdk()
    job_id = _idle_job(stack, qa_path)
    seen: list[str] = []
    with _open_stream(stack, job_id) as lines:
        for line in lines:  # the read timeout (30 s) fails the test if no heartbeat comes
            seen.append(line)
            if seen.count(": ping") == 3:
                break
        assert sdk.fine_tuning.jobs.retrieve(job_id).status not in TERMINAL
        sdk.fine_tuning.jobs.cancel(job_id)
        seen += list(lines)  # the stream ends by itself once the job is final
    streamed = _events("".join(line + "\n" for line in seen))
    listed = [e.model_dump() for e in sdk.fine_tuning.jobs.list_events(job_id, limit=1000).data][::-1]
    assert [e["id"] for e in streamed] == [e["id"] for e in listed]
    assert streamed[-1]["message"] == listed[-1]["message"]
    assert "cancel" in streamed[-1]["message"].lower(), streamed[-1]


def test_a_notification_wakes_the_stream_long_before_its_heartbeat(stack: Stack, qa_path: Path) -> None:
    """The stream (tuneforge/api/live_events.py, run here in-process against the stack's
    PostgreSQL) with a 120 s heartbeat: while its LISTEN connection is up it looks again only when
    woken or after the heartbeat, so an event written while it waits arrives within the bound only
    if the trigger's NOTIFY woke it. (Without LISTEN it would poll every 0.5 s; `listening` rules
    that out.)"""
    from anyio import to_thread

    from tuneforge.api.live_events import JobEventBus, job_event_stream
    from tuneforge.db import session_scope
    from tuneforge.models import job as jobs

    job_id = _idle_job(stack, qa_path)
    first = [e.id for e in stack.sdk().fine_tuning.jobs.list_events(job_id, limit=100).data][::-1]
    sessions = stack.services.sessions

    def write(message: str) -> None:
        with session_scope(sessions) as session:
            jobs.append_events(session, job_id, [jobs.EventRecord(message, type="metrics")])

    async def follow() -> tuple[list[str], list[str]]:
        bus = JobEventBus.for_engine(stack.services.engine)
        stream = job_event_stream(bus, sessions, job_id, after_seq=0, heartbeat_seconds=120)
        waiting: asyncio.Future[str] | None = None
        try:
            sent = [await anext(stream) for _ in first]
            live = []
            for step in (1, 2):
                waiting = asyncio.ensure_future(anext(stream))
                await asyncio.sleep(1)
                assert not waiting.done() and bus.listening  # it waits, with nothing to send
                await to_thread.run_sync(write, f"live {step}")
                try:
                    live.append(await asyncio.wait_for(waiting, timeout=20))  # an event, not a ping
                except TimeoutError:
                    raise AssertionError(f"live {step} not sent within 20 s: no NOTIFY woke it") from None
            return sent, live
        finally:
            if waiting is not None and not waiting.done():  # a failed check: end the wait first
                waiting.cancel()
                await asyncio.gather(waiting, return_exceptions=True)
            await stream.aclose()

    sent, live = asyncio.run(follow())
    assert [_events(text)[0]["id"] for text in sent] == first
    assert [_events(text)[0]["message"] for text in live] == ["live 1", "live 2"]
    stack.sdk().fine_tuning.jobs.cancel(job_id)


def _read_events(lines: Iterator[str], count: int) -> list[dict[str, Any]]:
    """Reads a stream's lines until `count` metrics events have come whole."""
    seen: list[str] = []
    for line in lines:
        seen.append(line)
        if not line:
            events = _events("".join(text + "\n" for text in seen))
            if sum(e["type"] == "metrics" for e in events) >= count:
                return events
    raise AssertionError(f"the stream ended before {count} metrics events: {seen}")


def test_a_reconnect_to_a_running_job_misses_no_event_and_repeats_none(stack: Stack, qa_path: Path) -> None:
    """A client drops the stream of a running job after a few steps, the job writes more events
    while it is away, and its reconnect with Last-Event-ID gets every event after the one it
    names, including those written while the new stream is open, once each, in order, until the
    job ends."""
    sdk = stack.sdk()
    training_file = sdk.files.create(file=qa_path.open("rb"), purpose="fine-tune").id
    method = {"type": "supervised", "supervised": {"hyperparameters": {"max_steps": 60}}}
    job = sdk.fine_tuning.jobs.create(
        model="tuneforge/tiny-chat",
        training_file=training_file,
        method=method,  # type: ignore[arg-type]
        extra_body={"queue": "long"},
    )
    # The module's worker crashes its jobs at step 7; this one runs on a worker that does not
    worker = stack.services.worker(queues="long", extra_env={"STANDIN_CRASH_AT": "0"})
    try:
        _reconnect_while_running(stack, job.id)
    finally:
        stack.services.stop(worker)


def _reconnect_while_running(stack: Stack, job_id: str) -> None:
    sdk = stack.sdk()
    with _open_stream(stack, job_id) as lines:
        before = _read_events(lines, 3)

    def metrics_written() -> int:
        return sum(e.type == "metrics" for e in sdk.fine_tuning.jobs.list_events(job_id, limit=1000).data)

    wait_for(lambda: metrics_written() >= 6, 60, "more steps while the client is away", stack.services)
    # Still running (60 steps of 0.2 s): the rest of its events are written while the new
    # stream is open
    assert sdk.fine_tuning.jobs.retrieve(job_id).status == "running"
    after, _ = _stream(stack, job_id, **{"Last-Event-ID": before[-1]["id"]})

    listed = [e.id for e in sdk.fine_tuning.jobs.list_events(job_id, limit=1000).data][::-1]
    assert [e["id"] for e in before + after] == listed
    steps = [e["message"].split(":")[0] for e in before + after if e["type"] == "metrics"]
    assert steps == [f"Step {n}/60" for n in range(1, 61)]
    assert sdk.fine_tuning.jobs.retrieve(job_id).status == "succeeded"


def test_a_delivery_written_while_the_sender_is_down_is_sent_when_it_is_back_without_the_api(
    stack: Stack, jobs: Jobs, qa_path: Path
) -> None:
    """The outbox outlives the beat process and needs nothing of the API's: a job cancelled while
    no sender runs is delivered by the next one, which starts while the API process is stopped;
    the API, started again, shows the delivery done."""
    sdk = stack.sdk()
    path = f"/later-{uuid.uuid4().hex[:8]}"
    endpoint = sdk.webhooks.create(
        name="later", url=stack.receiver.url(path), event_types=["fine_tuning.job.cancelled"]
    )
    stack.services.stop(stack.beat)
    training_file = sdk.files.create(file=qa_path.open("rb"), purpose="fine-tune").id
    job = sdk.fine_tuning.jobs.create(model="tuneforge/tiny-chat", training_file=training_file)
    sdk.fine_tuning.jobs.cancel(job.id)
    deliveries = f"/v1/webhook_endpoints/{endpoint.id}/deliveries"
    [pending] = stack.get(deliveries).json()["data"]
    assert (pending["status"], pending["attempts"]) == ("pending", 0)

    stack.services.stop(stack.serve)
    try:
        stack.beat = stack.services.beat()
        [received] = wait_for(
            lambda: stack.receiver.received(path), 60, "the delivery with the API down", stack.services
        )
        assert stack.serve.poll() is not None  # sent while no API process ran
    finally:
        stack.start_serve()
    event = sdk.webhooks.unwrap(received.body, received.headers, secret=endpoint.signing_secret)
    assert (event.type, event.data.id, received.headers["webhook-id"]) == (
        "fine_tuning.job.cancelled",
        job.id,
        pending["id"],
    )
    [done] = stack.get(deliveries).json()["data"]
    assert (done["id"], done["status"], done["attempts"], done["last_status_code"]) == (
        pending["id"],
        "delivered",
        1,
        200,
    )
    # the new beat's /metrics counts what it sent
    wait_for(
        lambda: _deliveries_counted(stack.beat_metrics).get("delivered", 0) >= 1,
        15,
        "the new beat's /metrics to count its delivery",
        stack.services,
    )
