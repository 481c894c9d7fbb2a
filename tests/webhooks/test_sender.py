"""The webhook sender's rules, one pass at a time, on a migrated SQLite database and a receiver on
127.0.0.1 (no processes): retries until the schedule runs out, then a recorded failure; each
attempt signed afresh under the same webhook-id; a day's limit; a delivery held by a sender that
died is taken again only after its hold; the URL policy checked again at send time, and the
request sent to the address that was checked."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from openai import OpenAI
from sqlalchemy.orm import Session, sessionmaker

from tests.support import wait_for
from tests.support.receiver import Received, Receiver, start_receiver
from tuneforge.config import Settings
from tuneforge.db import make_engine, make_sessionmaker, migrate, session_scope, utcnow
from tuneforge.models import webhook
from tuneforge.models.project import DEFAULT_PROJECT_ID
from tuneforge.worker.webhooks import Target, UrlRefused, attempt, resolve, retry_at, send_due

SUCCEEDED = "fine_tuning.job.succeeded"


@pytest.fixture(scope="module")
def sessions(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sessionmaker[Session]]:
    url = f"sqlite:///{tmp_path_factory.mktemp('sender') / 'tuneforge.db'}"
    migrate(url)
    engine = make_engine(url)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    server = start_receiver()
    yield server
    server.close()


def _settings(tmp_path: Path, **values: object) -> Settings:
    return Settings(data_dir=tmp_path, **{"webhook_allow_hosts": "127.0.0.1", **values})  # type: ignore[arg-type]


def _endpoint_and_event(sessions: sessionmaker[Session], url: str) -> tuple[str, str]:
    """An endpoint written straight to the database (as if its URL passed the API's checks) and
    one outbox row for it."""
    with session_scope(sessions) as session:
        endpoint = webhook.create_endpoint(
            session, DEFAULT_PROJECT_ID, name="t", url=url, event_types=[SUCCEEDED]
        )
        [delivery_id] = webhook.enqueue_event(session, DEFAULT_PROJECT_ID, SUCCEEDED, {"id": "ftjob-x"})
        return endpoint.id, delivery_id


def _delivery(sessions: sessionmaker[Session], endpoint_id: str, delivery_id: str) -> webhook.WebhookDelivery:
    with session_scope(sessions) as session:
        found = webhook.get_delivery(session, endpoint_id, delivery_id)
        assert found is not None
        return found


def _delivered_metric(outcome: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("tuneforge_webhook_deliveries_total", {"outcome": outcome}) or 0.0


def _clear(sessions: sessionmaker[Session]) -> None:
    with session_scope(sessions) as session:
        for endpoint in webhook.list_endpoints(session, DEFAULT_PROJECT_ID, limit=100):
            webhook.delete_endpoint(session, endpoint)


def test_retries_until_the_schedule_runs_out_then_fails(
    sessions: sessionmaker[Session], receiver: Receiver, tmp_path: Path
) -> None:
    _clear(sessions)
    settings = _settings(tmp_path, webhook_retry_seconds="0,0")
    endpoint_id, delivery_id = _endpoint_and_event(sessions, receiver.url("/down", 503))
    before = {o: _delivered_metric(o) for o in ("retry", "gave_up")}
    for _ in range(4):  # the fourth pass finds nothing due
        send_due(settings, sessions, budget_seconds=0)
    # /metrics counts each attempt by outcome: two to be retried, then the one given up
    assert {o: _delivered_metric(o) - before[o] for o in before} == {"retry": 2, "gave_up": 1}
    attempts = receiver.received("/down")
    assert [r.headers["webhook-id"] for r in attempts] == [delivery_id] * 3
    failed = _delivery(sessions, endpoint_id, delivery_id)
    assert (failed.status, failed.attempts, failed.last_status_code) == ("failed", 3, 503)
    assert failed.last_error == "HTTP 503" and failed.next_attempt_at is None


def test_the_schedule_stretches_by_jitter_and_gives_up_after_a_day(tmp_path: Path) -> None:
    settings = _settings(tmp_path, webhook_retry_seconds="10,100")
    now = utcnow()
    first = retry_at(settings, 1, now, now)
    assert first is not None and timedelta(seconds=10) <= first - now <= timedelta(seconds=12)
    assert retry_at(settings, 3, now, now) is None
    assert retry_at(settings, 1, now - timedelta(hours=24), now) is None


def test_a_held_delivery_is_taken_again_only_after_its_hold(
    sessions: sessionmaker[Session], receiver: Receiver
) -> None:
    _clear(sessions)
    _endpoint_and_event(sessions, receiver.url("/held"))
    now = utcnow()
    hold = timedelta(seconds=70)
    with session_scope(sessions) as session:
        [taken] = webhook.claim_due_deliveries(session, now, hold_for=hold, limit=10)
    with session_scope(sessions) as session:  # the sender that took it died: nobody else takes it
        assert (
            webhook.claim_due_deliveries(session, now + timedelta(seconds=60), hold_for=hold, limit=10) == []
        )
    with session_scope(sessions) as session:
        [again] = webhook.claim_due_deliveries(session, now + timedelta(seconds=71), hold_for=hold, limit=10)
    assert again.id == taken.id


def test_the_url_policy_is_checked_again_at_send_time(
    sessions: sessionmaker[Session], receiver: Receiver, tmp_path: Path
) -> None:
    """An endpoint whose host now resolves to a loopback address gets nothing; an allowed name
    is sent to the address it was resolved to, still named in the Host header, and verifies."""
    _clear(sessions)
    port = receiver.base_url.rsplit(":", 1)[1]
    with pytest.raises(UrlRefused, match=r"resolves to .*a loopback address"):
        resolve(Target(f"https://tf-test:{port}/", "https", "localhost", int(port), allowed=False))
    refused = attempt(
        Settings(data_dir=tmp_path), f"https://localhost:{port}/nope", "wh_1", "{}", ["whsec_AAAA"]
    )
    assert refused.status_code is None and "loopback" in (refused.error or "")
    assert receiver.received("/nope") == []

    secret = webhook.new_signing_secret()
    allowed = _settings(tmp_path, webhook_allow_hosts="localhost")
    url = receiver.url("/pinned").replace("127.0.0.1", "localhost")
    body = webhook.event_body("evt_1", SUCCEEDED, utcnow(), {"id": "ftjob-x"})
    assert attempt(allowed, url, "wh_pinned", body, [secret]).status_code == 200
    [got] = receiver.received("/pinned")
    assert got.headers["host"] == f"localhost:{port}"
    event = OpenAI(api_key="unused").webhooks.unwrap(got.body, got.headers, secret=secret)
    assert (event.id, event.data.id) == ("evt_1", "ftjob-x")


def test_each_attempt_is_signed_afresh_under_the_same_webhook_id(
    sessions: sessionmaker[Session], receiver: Receiver, tmp_path: Path
) -> None:
    """A retry more than a second after the first attempt carries its own timestamp and a
    signature over it (a replayed first attempt would carry the old ones), under the same
    `webhook-id`; both verify with the SDK's `unwrap`."""
    _clear(sessions)
    settings = _settings(tmp_path, webhook_retry_seconds="1.1")
    endpoint_id, delivery_id = _endpoint_and_event(sessions, receiver.url("/afresh", 503, 200))
    with session_scope(sessions) as session:
        endpoint = webhook.get_endpoint(session, DEFAULT_PROJECT_ID, endpoint_id)
        assert endpoint is not None
        secret = endpoint.signing_secret

    def second_attempt() -> list[Received] | None:
        send_due(settings, sessions, budget_seconds=0)
        got = receiver.received("/afresh")
        return got if len(got) == 2 else None

    first, second = wait_for(second_attempt, 30, "the retry")
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == delivery_id
    assert int(second.headers["webhook-timestamp"]) > int(first.headers["webhook-timestamp"])
    assert second.headers["webhook-signature"] != first.headers["webhook-signature"]
    assert first.body == second.body
    sdk = OpenAI(api_key="unused")
    for got in (first, second):
        event = sdk.webhooks.unwrap(got.body, got.headers, secret=secret)
        assert (event.id, event.data.id) == (json.loads(got.body)["id"], "ftjob-x")
    delivered = _delivery(sessions, endpoint_id, delivery_id)
    assert (delivered.status, delivered.attempts, delivered.last_status_code) == ("delivered", 2, 200)
