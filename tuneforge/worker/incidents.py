"""What a tenant is told when its job fails, and what operators find in the worker's log.

A failed job's `error` carries a stable `code` and a short message that names an incident id;
its events say the same. What would show the service's internals (a traceback with server
paths, the training log's last lines, SQL and its parameters, host names and process ids) goes
only to the worker's log, under that incident id, where an operator finds it with `grep`.

Messages that help the user fix the job (a bad hyperparameter, out of memory, a data problem)
stay readable: the first line of the error, with server paths cut to their last component.
"""

from __future__ import annotations

import errno
import logging
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

INTERNAL_ERROR = "internal_error"
DISK_FULL = "disk_full"
MAX_MESSAGE_CHARS = 300

# Codes whose message is ours alone, never the text of an exception.
_GENERIC = {
    INTERNAL_ERROR: "an internal error stopped the job",
    DISK_FULL: "the worker ran out of disk space (no space left on device) while running the job",
}

_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])/(?:[^\s/'\"`:,;()\[\]{}<>]+/)+([^\s/'\"`:,;()\[\]{}<>]*)")


@dataclass(frozen=True)
class Failure:
    """What the tenant sees of a failure."""

    code: str
    message: str
    incident: str

    @property
    def data(self) -> dict[str, Any]:
        return {"code": self.code, "incident": self.incident}


def is_disk_full(error: BaseException | None) -> bool:
    """Whether `error`, or an exception it was raised from or while handling, is ENOSPC."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if "no space left on device" in str(error).lower():  # torch's writer wraps it in a RuntimeError
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def new_incident_id() -> str:
    return f"inc-{secrets.token_hex(6)}"


def public_message(code: str, message: str) -> str:
    """The part of an error message a tenant may see: ours for internal errors; otherwise the
    first line, server paths cut to their last component, at most MAX_MESSAGE_CHARS."""
    if code in _GENERIC:
        return _GENERIC[code]
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    text = _ABSOLUTE_PATH.sub(lambda m: m.group(1) or "<path>", lines[0] if lines else code)
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[: MAX_MESSAGE_CHARS - 1].rstrip() + "…"
    return text


def report(
    job_id: str, code: str, message: str, *, detail: str = "", log_tail: Sequence[str] = ()
) -> Failure:
    """Logs everything known about a failure under a new incident id and returns what the tenant
    is shown: the code and a short message naming the incident."""
    incident = new_incident_id()
    parts = [f"job {job_id}: incident {incident}: failed with {code}: {message}"]
    if detail.strip():
        parts.append(detail.rstrip())
    if log_tail:
        parts.append("last lines of the training log:\n" + "\n".join(log_tail))
    log.error("\n".join(parts))
    text = f"{public_message(code, message)} (incident {incident})"
    return Failure(code, text, incident)
