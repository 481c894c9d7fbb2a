"""Keeping a running job alive through faults around its worker.

Two kinds of fault, both outside the job's control:

- The database or the broker is unreachable for a while (a restart, a dropped connection, a
  failover). Training goes on in its own process; the supervisor holds events, progress and
  checkpoint rows in memory and writes them once the database answers again. It retries with
  backoff for as long as its lease would last: the lease expiry is on the database, so this worker
  keeps its own copy of it (`LeaseClock`), and once an outage outlasts the lease it must assume the
  job has been given to another worker (`OutageOutlastedLease`).
- The worker is asked to shut down (SIGTERM from an orchestrator that sends SIGKILL after a grace
  period). Celery's warm shutdown waits for the running task and does not tell the pool process,
  so the main process forwards the request (`forward_shutdown_to_pool`) and the pool process sets a
  flag the supervision loop reads (`shutdown_requested_at`): the job checkpoints and is handed
  back to its queue before the grace period ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, TypeVar

import kombu.exceptions
import psycopg
import redis.exceptions
from sqlalchemy import exc as sa_exc

from tuneforge.db import DATABASE_UNREACHABLE_ERRORS

log = logging.getLogger(__name__)

T = TypeVar("T")

# --- transient errors -------------------------------------------------------------------------

_TRANSIENT = (
    *DATABASE_UNREACHABLE_ERRORS,
    sa_exc.DisconnectionError,
    psycopg.InterfaceError,  # a connection already closed underneath the pool
    kombu.exceptions.OperationalError,  # the broker refused or dropped a publish
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    ConnectionError,
    TimeoutError,
)


def is_transient(error: BaseException) -> bool:
    """Whether `error` is the database or the broker being briefly unreachable (worth retrying),
    rather than a fault in the job or in this code."""
    if isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated:
        return True
    return isinstance(error, _TRANSIENT)


def describe_error(error: BaseException) -> str:
    """One line naming `error` for a job's error message or a log, without SQLAlchemy's statement
    and parameters (which say nothing to a user and may hold their data)."""
    if isinstance(error, sa_exc.StatementError) and error.orig is not None:
        error = error.orig
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


# --- backoff and the lease --------------------------------------------------------------------


@dataclass
class Backoff:
    """Exponential backoff with full jitter: delays from `first` doubling up to `cap` seconds."""

    first: float = 0.25
    cap: float = 5.0
    _ceiling: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        self._ceiling = self.first

    def next_delay(self) -> float:
        delay = self._ceiling * (0.5 + random.random() / 2)
        self._ceiling = min(self.cap, self._ceiling * 2)
        return delay

    def reset(self) -> None:
        self._ceiling = self.first


class LeaseClock:
    """This worker's view of when its lease on a job runs out, on the local monotonic clock.

    A renewal counts from the moment its statement was sent (the database set the expiry a little
    later), so the local expiry is never later than the database's: a worker that cannot renew
    stops believing it holds the job before anyone else can take it."""

    def __init__(self, lease_seconds: float, renewed_at: float | None = None) -> None:
        self.lease_seconds = lease_seconds
        self.expires_at = (time.monotonic() if renewed_at is None else renewed_at) + lease_seconds

    def renewed(self, sent_at: float) -> None:
        self.expires_at = max(self.expires_at, sent_at + self.lease_seconds)

    def remaining(self, now: float | None = None) -> float:
        return self.expires_at - (time.monotonic() if now is None else now)

    def expired(self, now: float | None = None) -> bool:
        return self.remaining(now) <= 0


class OutageOutlastedLease(Exception):
    """The database stayed unreachable past this worker's lease: the job may run elsewhere now."""


class Outage:
    """The state of one run's link to the database: whether writes are failing, since when, and
    when to try again. The supervision loop asks `due()` before a write and reports the result
    with `failed()` or `recovered()`."""

    def __init__(self, job_id: str, lease: LeaseClock, backoff: Backoff | None = None) -> None:
        self.job_id = job_id
        self.lease = lease
        self.backoff = backoff or Backoff()
        self.since: float | None = None
        self.next_try = 0.0
        self.failures = 0

    @property
    def active(self) -> bool:
        return self.since is not None

    def due(self, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) >= self.next_try

    def failed(self, error: BaseException, now: float | None = None) -> None:
        """Records a failed write; raises `OutageOutlastedLease` once the lease has run out."""
        now = time.monotonic() if now is None else now
        if self.since is None:
            self.since = now
            log.warning(
                "job %s: database unreachable (%s); training goes on, events are held, the lease "
                "lasts %.0fs more",
                self.job_id,
                describe_error(error),
                self.lease.remaining(now),
            )
        self.failures += 1
        self.check_lease(now, error)
        self.next_try = now + min(self.backoff.next_delay(), max(0.0, self.lease.remaining(now)))

    def check_lease(self, now: float | None = None, error: BaseException | None = None) -> None:
        if self.active and self.lease.expired(now):
            raise OutageOutlastedLease(
                f"the database was unreachable for {self.duration(now):.0f}s, longer than the "
                f"{self.lease.lease_seconds:.0f}s lease"
            ) from error

    def recovered(self, held: int, now: float | None = None) -> None:
        if self.since is not None:
            log.warning(
                "job %s: database reachable again after %.1fs (%d failed writes); %d held records written",
                self.job_id,
                self.duration(now),
                self.failures,
                held,
            )
        self.since = None
        self.failures = 0
        self.next_try = 0.0
        self.backoff.reset()

    def duration(self, now: float | None = None) -> float:
        if self.since is None:
            return 0.0
        return (time.monotonic() if now is None else now) - self.since


def retry_transient(
    action: Callable[[], T],
    *,
    until: float,
    what: str,
    backoff: Backoff | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Runs `action`, and again after each transient error (with backoff) until the monotonic
    time `until`; always at least once. Other errors pass through at once. Raises
    `OutageOutlastedLease` (caused by the last error) when time runs out."""
    backoff = backoff or Backoff()
    attempts = 0
    while True:
        attempts += 1
        try:
            return action()
        except Exception as error:
            if not is_transient(error):
                raise
            left = until - time.monotonic()
            if left <= 0:
                raise OutageOutlastedLease(
                    f"{what}: still failing after {attempts} tries ({describe_error(error)})"
                ) from error
            delay = min(backoff.next_delay(), left)
            log.warning("%s failed (%s); retrying in %.1fs", what, describe_error(error), delay)
            sleep(delay)


# --- shutdown ---------------------------------------------------------------------------------

# The main process tells its pool processes with this signal (Celery and billiard use SIGUSR1 in
# pool processes, and reset SIGTERM there to its default).
FORWARDED_SHUTDOWN_SIGNAL = signal.SIGUSR2


@dataclass
class _ShutdownState:
    requested_at: float | None = None
    running_job: str | None = None


_shutdown = _ShutdownState()


def shutdown_requested_at() -> float | None:
    """The monotonic time this process was asked to shut down, or None."""
    return _shutdown.requested_at


def request_shutdown() -> None:
    if _shutdown.requested_at is None:
        _shutdown.requested_at = time.monotonic()


@contextlib.contextmanager
def running_job(job_id: str) -> Iterator[None]:
    """Marks this process as running `job_id`: a SIGTERM then asks for a hand-back instead of
    ending the process at once."""
    _shutdown.running_job = job_id
    try:
        yield
    finally:
        _shutdown.running_job = None


def _on_forwarded_shutdown(signum: int, frame: FrameType | None) -> None:
    request_shutdown()


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    """A SIGTERM sent to the pool process itself (a process-group or cgroup kill, billiard's
    terminate): with a job running, hand it back like a forwarded shutdown; a second SIGTERM, or
    one with no job, ends the process as before."""
    if _shutdown.running_job is not None and _shutdown.requested_at is None:
        request_shutdown()
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def install_pool_process_handlers(**_: Any) -> None:
    """In a pool process (Celery's `worker_process_init`): listen for a shutdown request."""
    signal.signal(FORWARDED_SHUTDOWN_SIGNAL, _on_forwarded_shutdown)
    signal.signal(signal.SIGTERM, _on_sigterm)


def forward_shutdown_to_pool(**_: Any) -> None:
    """In the worker's main process (Celery's `worker_shutting_down`, which runs inside its
    signal handler): pass the request on to every pool process. Idle ones ignore it and end when
    the pool closes; a busy one hands its job back and returns."""
    from billiard.process import active_children

    for child in active_children():
        if "PoolWorker" in (child.name or "") and child.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, FORWARDED_SHUTDOWN_SIGNAL)


def connect_worker_signals() -> None:
    """Hooks the two handlers above into Celery's worker signals."""
    from celery.signals import worker_process_init, worker_shutting_down

    worker_process_init.connect(install_pool_process_handlers, weak=False)
    worker_shutting_down.connect(forward_shutdown_to_pool, weak=False)
