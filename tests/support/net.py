"""Ports and polling."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(
    predicate: Callable[[], Any],
    timeout: float,
    what: str,
    logs: Callable[[], str] | Any | None = None,
    interval: float = 0.2,
) -> Any:
    """Polls `predicate` until it returns something truthy (returned) or `timeout` seconds pass
    (AssertionError naming `what`). `logs` is a callable or an object with a `logs()` method whose
    text is added to the error."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    extra = ""
    if logs is not None:
        extra = "\n" + (logs() if callable(logs) else logs.logs())
    raise AssertionError(f"timed out after {timeout}s waiting for {what}{extra}")
