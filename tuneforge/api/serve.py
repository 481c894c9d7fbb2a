"""`tuneforge serve`: uvicorn on the app factory, plus the embedded worker when no broker is set."""

from __future__ import annotations

import logging
from collections.abc import Callable

import uvicorn

from tuneforge.api.auth import admin_key_path, resolve_admin_key
from tuneforge.config import Settings, get_settings

log = logging.getLogger(__name__)


def start_embedded_worker(settings: Settings) -> Callable[[], None] | None:
    """HOOK for job execution (issue 4): with no broker configured (`settings.embedded_broker`),
    start the embedded worker process here and return a function that stops it. Returning None
    runs the API alone."""
    from tuneforge.worker.embedded import start_embedded_worker as start

    print(f"Embedded worker and reconciler: logs in {settings.data_dir / 'logs'}", flush=True)
    return start(settings).stop


def announce_admin_key(settings: Settings) -> str:
    """Makes sure an admin key exists and says where it is (never the key itself)."""
    resolve_admin_key(settings)
    if settings.admin_key is not None:
        return "Admin key: the value of TUNEFORGE_ADMIN_KEY."
    return f"Admin key: {admin_key_path(settings)} (send it as 'Authorization: Bearer <key>')."


def serve(host: str | None = None, port: int | None = None, *, access_log: bool = False) -> int:
    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
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
        )
    finally:
        if stop_worker is not None:
            stop_worker()
    return 0
