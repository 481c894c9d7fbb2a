"""`tuneforge serve`: uvicorn on the app factory, plus the embedded worker when no broker is set."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

import uvicorn

from tuneforge.api.auth import admin_key_path, resolve_admin_key
from tuneforge.config import Settings, get_settings

log = logging.getLogger(__name__)

KEEP_ALIVE_SECONDS = 75


def start_embedded_worker(settings: Settings) -> Callable[[], None] | None:
    """With no broker configured (`settings.embedded_broker`): starts the embedded worker and the
    reconciler's beat as child processes; returns a function that stops them."""
    from tuneforge.worker.embedded import start_embedded_worker as start

    print(f"Embedded worker and reconciler: logs in {settings.data_dir / 'logs'}", flush=True)
    return start(settings).stop


def announce_admin_key(settings: Settings) -> str:
    """Makes sure an admin key exists and says where it is (never the key itself)."""
    resolve_admin_key(settings)
    if settings.admin_key is not None:
        return "Admin key: the value of TUNEFORGE_ADMIN_KEY."
    return f"Admin key: {admin_key_path(settings)} (send it as 'Authorization: Bearer <key>')."


def ensure_schema(settings: Settings) -> str | None:
    """None when the database is at the migrations' head, else why the API must not start.
    Embedded SQLite (one machine, one API process) is migrated here instead."""
    from sqlalchemy.exc import SQLAlchemyError

    from tuneforge.db import SchemaOutdated, check_schema, make_engine, migrate

    engine = make_engine(settings.database_url, pool_size=1, max_overflow=0)
    try:
        check_schema(engine)
    except SchemaOutdated as exc:
        if engine.dialect.name != "sqlite":
            return str(exc)
        print("Migrating the embedded SQLite database (tuneforge migrate)...", flush=True)
        migrate(settings.database_url)
    except SQLAlchemyError as exc:
        url = engine.url.render_as_string(hide_password=True)
        return f"Cannot reach the database {url}: {type(exc).__name__}: {str(exc).splitlines()[0]}"
    finally:
        engine.dispose()
    return None


def serve(host: str | None = None, port: int | None = None, *, access_log: bool = False) -> int:
    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    refusal = ensure_schema(settings)
    if refusal is not None:
        print(f"tuneforge serve: {refusal}", file=sys.stderr, flush=True)
        return 2
    host = host or settings.host
    port = port or settings.port
    print(announce_admin_key(settings), flush=True)
    print(f"Tuneforge API on http://{host}:{port} (OpenAPI at /docs)", flush=True)
    stop_worker = start_embedded_worker(settings) if settings.embedded_broker else None
    try:
        uvicorn.run(
            "tuneforge.api.app:create_app",
            factory=True,
            host=host,
            port=port,
            access_log=access_log,
            log_level="info",
            timeout_graceful_shutdown=10,
            # Longer than clients keep an idle connection (httpx, under the openai SDK: 5 s), so
            # that the client, not the server, closes it: a server closing a connection as the
            # client reuses it fails that request.
            timeout_keep_alive=KEEP_ALIVE_SECONDS,
        )
    finally:
        if stop_worker is not None:
            stop_worker()
    return 0
