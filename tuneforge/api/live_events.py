"""Live job events: `GET /v1/fine_tuning/jobs/{id}/events?stream=true` as Server-Sent Events.

A stream sends the job's events oldest first (each `id:` the event id, `data:` the event object
of `list_events`), from the first or after the event a reconnecting client names in
`Last-Event-ID`, and ends once the job has a final status and every event written up to then
has been sent. Between events it sends a comment (`: ping`) every
`event_stream_heartbeat_seconds`, so proxies keep the connection open.

What wakes a stream: on PostgreSQL, a trigger on `job_events` (migration 0004) NOTIFYs channel
`tuneforge_job_events` with the job id at commit; one LISTEN connection per API process (opened
with its first stream, closed with its last) wakes the streams of that job. A stream also looks
again after each heartbeat, so a notification lost while that connection reconnects delays
events by one heartbeat at most. SQLite (embedded mode, one machine) has no notifications:
there a stream polls, every `SQLITE_POLL_SECONDS`.

Each look reads the job's status first and its new events second: when the status read says
final, the events read sees every event committed with or before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from anyio import to_thread
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from tuneforge.api.schemas import event_object
from tuneforge.models import job as jobs

log = logging.getLogger(__name__)

CHANNEL = "tuneforge_job_events"
SQLITE_POLL_SECONDS = 0.5
BATCH = 500
RECONNECT_SECONDS = 1.0


class JobEventBus:
    """Wakes the live streams of a job when its events are written (PostgreSQL LISTEN/NOTIFY).
    With no PostgreSQL (`conninfo` None) it never wakes anyone and `listening` stays False."""

    def __init__(self, conninfo: str | None) -> None:
        self._conninfo = conninfo
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._subscribers = 0
        self._task: asyncio.Task[None] | None = None
        self._ready: asyncio.Event | None = None
        self.listening = False

    @property
    def subscribers(self) -> int:
        """Streams open now."""
        return self._subscribers

    @classmethod
    def for_engine(cls, engine: Engine) -> JobEventBus:
        if engine.dialect.name != "postgresql":
            return cls(None)
        return cls(engine.url.set(drivername="postgresql").render_as_string(hide_password=False))

    @asynccontextmanager
    async def subscribe(self, job_id: str) -> AsyncIterator[asyncio.Event]:
        """An event set whenever the job's events may have changed (and once at the start of
        each LISTEN session); the caller clears it before each look."""
        wake = asyncio.Event()
        self._waiters.setdefault(job_id, set()).add(wake)
        self._subscribers += 1
        if self._conninfo is not None and self._task is None:
            self._ready = asyncio.Event()
            self._task = asyncio.create_task(self._listen(), name="tuneforge-job-event-listener")
        try:
            if self._ready is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._ready.wait(), timeout=5)
            yield wake
        finally:
            waiters = self._waiters.get(job_id, set())
            waiters.discard(wake)
            if not waiters:
                self._waiters.pop(job_id, None)
            self._subscribers -= 1
            if self._subscribers == 0 and self._task is not None:
                self._task.cancel()
                self._task, self._ready, self.listening = None, None, False

    def _wake(self, job_id: str | None = None) -> None:
        groups = self._waiters.values() if job_id is None else [self._waiters.get(job_id, set())]
        for waiters in groups:
            for wake in waiters:
                wake.set()

    async def _listen(self) -> None:
        from psycopg import AsyncConnection

        assert self._conninfo is not None
        while True:
            try:
                connection = await AsyncConnection.connect(self._conninfo, autocommit=True)
                async with connection:
                    await connection.execute(f"LISTEN {CHANNEL}")
                    self.listening = True
                    if self._ready is not None:
                        self._ready.set()
                    self._wake()  # events written while (re)connecting
                    async for note in connection.notifies():
                        self._wake(note.payload)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("job event listener: %s; reconnecting in %.0f s", exc, RECONNECT_SECONDS)
            self.listening = False
            if self._ready is not None:
                self._ready.set()  # streams go on, looking at each heartbeat
            await asyncio.sleep(RECONNECT_SECONDS)


def _look(
    sessions: sessionmaker[Session], job_id: str, after_seq: int
) -> tuple[str | None, list[dict[str, Any]], list[int]]:
    """The job's status, then its events after `after_seq` (oldest first) as objects and seqs."""
    with sessions() as session:
        job = jobs.get_job_any_project(session, job_id)
        status = job.status if job is not None else None
        rows = jobs.list_events_after_seq(session, job_id, after_seq, limit=BATCH)
        return status, [event_object(e) for e in rows], [e.seq for e in rows]


def _sse(event: dict[str, Any]) -> str:
    return f"id: {event['id']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n"


async def job_event_stream(
    bus: JobEventBus,
    sessions: sessionmaker[Session],
    job_id: str,
    *,
    after_seq: int,
    heartbeat_seconds: float,
) -> AsyncIterator[str]:
    """The SSE text of the job's events after `after_seq`, live, until the job is final."""
    async with bus.subscribe(job_id) as wake:
        sent_at = time.monotonic()
        while True:
            wake.clear()
            status, events, seqs = await to_thread.run_sync(_look, sessions, job_id, after_seq)
            for event in events:
                yield _sse(event)
            if seqs:
                after_seq = seqs[-1]
                sent_at = time.monotonic()
                if len(seqs) == BATCH:
                    continue
            if status is None or jobs.JobStatus(status).is_terminal:
                return
            wait = heartbeat_seconds if bus.listening else min(SQLITE_POLL_SECONDS, heartbeat_seconds)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout=wait)
            if time.monotonic() - sent_at >= heartbeat_seconds:
                yield ": ping\n\n"
                sent_at = time.monotonic()
