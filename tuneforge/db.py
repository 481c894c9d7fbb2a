"""Database plumbing: the declarative base, engines and sessions.

The request boundary owns the transaction: `get_session` commits after a successful request and
rolls back on error; services only flush. Work that must happen only once the data is visible
(sending a Celery task) is registered with `after_commit` and runs after the commit succeeds.
A worker task opens one session per unit of work with `session_scope`.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from anyio import CapacityLimiter, Semaphore, to_thread
from psycopg import OperationalError as PsycopgOperationalError
from psycopg.rows import namedtuple_row
from sqlalchemy import (
    DateTime,
    Engine,
    MetaData,
    Row,
    Select,
    TypeDecorator,
    create_engine,
    event,
    inspect,
    text,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.pool import QueuePool
from starlette.requests import Request

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig
    from psycopg import AsyncConnection
    from psycopg_pool import AsyncConnectionPool

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

log = logging.getLogger(__name__)

# What the database layers raise while the database is down, restarting, has dropped a connection,
# or has no connection free in time. The API answers these with a 503 the client retries; the
# worker retries them (tuneforge/worker/resilience.py adds the broker's and a few more).
DATABASE_UNREACHABLE_ERRORS: tuple[type[Exception], ...] = (
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.TimeoutError,
    PsycopgOperationalError,
)

SQLITE_BUSY_TIMEOUT_MS = 30_000
_AFTER_COMMIT = "tuneforge_after_commit"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UtcDateTime column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


def _sqlite_on_connect(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def make_engine(url: str, *, pool_size: int = 40, max_overflow: int = 10) -> Engine:
    """An engine for `url`. SQLite gets WAL, foreign keys and a busy timeout on each connection;
    PostgreSQL a pool large enough for the API's thread pool.

    SQLite's pool never makes anyone wait for a connection (its overflow is unlimited): a request
    holds its session's connection while it waits for a thread, so with a bounded pool, threads
    waiting for connections and connections waiting for threads stall each other until the pool's
    timeout. A SQLite connection is an open file; the waiting that matters, for the write lock,
    is the busy timeout's."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
            pool_size=pool_size,
            max_overflow=-1,
        )
        event.listen(engine, "connect", _sqlite_on_connect)
        return engine
    # pre-ping: a connection the server dropped (a restart, pg_terminate_backend) is replaced on
    # checkout instead of failing the request or task that drew it.
    return create_engine(
        url, pool_size=pool_size, max_overflow=max_overflow, pool_pre_ping=True, pool_recycle=3600
    )


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False, autoflush=True)


def after_commit(session: Session, callback: Callable[[], None]) -> None:
    """Runs `callback` once the session's transaction has committed (never after a rollback)."""
    session.info.setdefault(_AFTER_COMMIT, []).append(callback)


def commit(session: Session) -> None:
    """Commits, then runs the callbacks registered with `after_commit`."""
    callbacks: list[Callable[[], None]] = session.info.pop(_AFTER_COMMIT, [])
    session.commit()
    for callback in callbacks:
        callback()


def rollback(session: Session) -> None:
    session.info.pop(_AFTER_COMMIT, None)
    session.rollback()


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work outside a request (worker tasks, CLI): commit on success, else roll back."""
    session = factory()
    try:
        yield session
        commit(session)
    except BaseException:
        rollback(session)
        raise
    finally:
        session.close()


def make_read_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Sessions for read-only requests: autocommit connections from the same pool, so a read
    costs its queries and nothing else (no BEGIN/COMMIT round trips)."""
    return make_sessionmaker(engine.execution_options(isolation_level="AUTOCOMMIT"))


class Reader:
    """Single-row reads for the hot GET paths (the bearer-key check, a job by id), awaited on the
    event loop. On PostgreSQL they run on a pool of psycopg `AsyncConnection`s in autocommit mode
    (opened by the app's lifespan; it grows to `max_connections`, enough for every request in
    flight not to wait): no thread hop, no session, each statement compiled once to SQL and
    prepared by the server. On SQLite (embedded, one process) they run in a worker thread on an
    autocommit connection of the engine. Either way a row answers the labels of the statement's
    columns as attributes; nothing is cached."""

    def __init__(self, engine: Engine, max_connections: int = 32, checkout_timeout: float = 10.0) -> None:
        self._engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        self.checkout_timeout = checkout_timeout
        self._drained_at = 0.0
        self._sql: dict[Select, str] = {}
        self._pool: AsyncConnectionPool[AsyncConnection[Any]] | None = None
        if engine.dialect.name == "postgresql":
            from psycopg_pool import AsyncConnectionPool

            conninfo = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
            self._pool = AsyncConnectionPool(
                conninfo,
                min_size=2,
                max_size=max_connections,
                kwargs={"autocommit": True, "row_factory": namedtuple_row},
                open=False,
            )

    async def open(self) -> None:
        if self._pool is not None:
            await self._pool.open(wait=True, timeout=30)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()

    async def first(self, statement: Select, params: dict[str, Any]) -> Any:
        """The first row of `statement` bound with `params`, or None.

        A read on a connection the server has dropped (a restart, `pg_terminate_backend`) empties
        the pool of its idle connections, which were likely dropped too, and runs once more on a
        new one; while the database is down, waiting for a connection ends after
        `checkout_timeout` with `psycopg_pool.PoolTimeout`."""
        if self._pool is None:
            return await to_thread.run_sync(self._first_sync, statement, params)
        sql = self._sql.get(statement)
        if sql is None:
            sql = self._sql[statement] = str(statement.compile(dialect=self._engine.dialect))
        for attempt in (1, 2):
            connection = await self._pool.getconn(timeout=self.checkout_timeout)
            try:
                cursor = await connection.execute(sql, params, prepare=True)
                return await cursor.fetchone()
            except PsycopgOperationalError as exc:
                if not connection.closed or attempt == 2:
                    raise
                log.warning("database connection lost (%s); draining the read pool", exc)
                await self._drain()
            finally:
                await self._pool.putconn(connection)
        raise AssertionError("unreachable")

    async def _drain(self) -> None:
        """Drops the pool's connections (those out now are closed when they come back), at most
        once a second however many reads see the loss."""
        assert self._pool is not None
        now = time.monotonic()
        if now - self._drained_at >= 1.0:
            self._drained_at = now
            await self._pool.drain()

    def _first_sync(self, statement: Select, params: dict[str, Any]) -> Row[Any] | None:
        with self._engine.connect() as connection:
            return connection.execute(statement, params).first()


READ_ONLY_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

# Commits and rollbacks get threads of their own. A request's commit must never queue behind
# route bodies in the shared pool: those may be waiting for the very locks the commit releases
# (SQLite's write lock, a PostgreSQL row lock), which would deadlock until a timeout.
TRANSACTION_END_THREADS = CapacityLimiter(64)


def session_slots(engine: Engine, threads: int) -> Semaphore | None:
    """How many requests may hold a session at once in an API process whose sync work runs on
    `threads` threads, or None for no bound (a pool that never makes anyone wait: SQLite's).

    A request's session keeps its connection from its first query to its end, across thread
    hops (a dependency's in one thread, the route's in the next) and the waits between them. On
    a bounded pool, requests holding every connection while they wait for a thread, and every
    thread waiting for a connection, stall each other until the pool's timeout (seen under 200
    clients: 30 s stalls and 503s). Bounded at the pool's capacity less the threads, the
    sessions leave a connection for each thread's other work (live events, metrics), so no
    thread waits for a connection and every waiting request gets its thread."""
    pool = engine.pool
    if not isinstance(pool, QueuePool) or pool._max_overflow < 0:  # SQLAlchemy keeps it only there
        return None
    return Semaphore(max(1, pool.size() + pool._max_overflow - threads))


async def get_session(request: Request) -> AsyncIterator[Session]:
    """The request's session (a FastAPI dependency): commits after the route succeeds, rolls back
    when it raises. Used with `scope="function"` so the commit happens before the response is
    sent. Read-only requests get an autocommit session; their end needs no I/O, so it runs on
    the event loop, while a commit or rollback that talks to the database runs in a thread.
    Where the app bounds its sessions (`session_slots`), a request waits for a slot first, on
    the event loop, holding nothing."""
    read_only = request.method in READ_ONLY_METHODS
    state = request.app.state
    slots: Semaphore | None = getattr(state, "session_slots", None)
    factory: sessionmaker[Session] = state.read_sessionmaker if read_only else state.sessionmaker
    async with slots if slots is not None else nullcontext():
        session = factory()
        try:
            yield session
            if read_only:
                commit(session)
            else:
                await to_thread.run_sync(commit, session, limiter=TRANSACTION_END_THREADS)
        except BaseException:
            if session.in_transaction() and not read_only:
                await to_thread.run_sync(rollback, session, limiter=TRANSACTION_END_THREADS)
            else:
                rollback(session)
            raise
        finally:
            session.close()


MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(url: str) -> AlembicConfig:
    """Alembic's configuration for `url`, with the repository's migrations directory."""
    from alembic.config import Config

    config = Config(str(MIGRATIONS_DIR.parent / "alembic.ini"))
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["url"] = url
    return config


def migrate(url: str, revision: str = "head") -> None:
    """`alembic upgrade <revision>` for the database at `url`."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    from alembic import command

    command.downgrade(alembic_config(url), revision)


@lru_cache(maxsize=1)
def head_revisions() -> frozenset[str]:
    """The revisions the code expects: the heads of the migrations directory."""
    from alembic.script import ScriptDirectory

    return frozenset(ScriptDirectory.from_config(alembic_config("")).get_heads())


def schema_revisions(engine: Engine) -> frozenset[str]:
    """The revisions the database is at (empty when it was never migrated)."""
    with engine.connect() as connection:
        if not inspect(connection).has_table("alembic_version"):
            return frozenset()
        rows = connection.execute(text("SELECT version_num FROM alembic_version"))
        return frozenset(str(row[0]) for row in rows)


class SchemaOutdated(RuntimeError):
    """The database's schema is not the one this code expects."""


def check_schema(engine: Engine) -> None:
    """Raises SchemaOutdated, saying what to do, unless the database is at the migrations' head."""
    current, heads = schema_revisions(engine), head_revisions()
    if current == heads:
        return
    url = engine.url.render_as_string(hide_password=True)
    found = ", ".join(sorted(current)) or "no schema"
    raise SchemaOutdated(
        f"The database {url} is not migrated (found {found}; this version needs "
        f"{', '.join(sorted(heads))}): run `tuneforge migrate` first."
    )
