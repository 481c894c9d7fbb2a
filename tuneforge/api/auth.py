"""Bearer-key authentication: the admin key and project keys.

The admin key is `TUNEFORGE_ADMIN_KEY`, or one generated once into `<data_dir>/admin_key` (mode
0600). It acts as the built-in project `default` on the OpenAI endpoints and alone may call
/v1/admin/*. Project keys (`tf-...`) are stored as SHA-256 hashes and found by hash.
"""

from __future__ import annotations

import hmac
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tuneforge.api.errors import Unauthorized
from tuneforge.config import Settings
from tuneforge.db import Reader
from tuneforge.models import project as projects

ADMIN_KEY_FILE = "admin_key"


@dataclass(frozen=True)
class Caller:
    """Who is calling: the project every query is scoped to, and whether it is the admin."""

    project_id: str
    is_admin: bool = False


def admin_key_path(settings: Settings) -> Path:
    return settings.data_dir / ADMIN_KEY_FILE


def resolve_admin_key(settings: Settings) -> str:
    """The admin key: the configured one, or the one in `<data_dir>/admin_key`, written once with
    mode 0600 when missing (an exclusive create, so concurrent starts agree on one key)."""
    if settings.admin_key is not None:
        return settings.admin_key.get_secret_value()
    path = admin_key_path(settings)
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = "tf-admin-" + secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    return key


def bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise Unauthorized(
            "You didn't provide an API key. Send it in the Authorization header: 'Bearer <key>'."
        )
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("The Authorization header must be 'Bearer <key>'.")
    return token


class KeyCache:
    """Project keys this process has checked recently: key hash -> project id, for a few
    seconds, so a hot path does not ask the database on every request. Revoking a key through
    this process forgets it at once; other processes stop accepting it within `ttl`."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._entries: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def get(self, key_hash: str) -> str | None:
        entry = self._entries.get(key_hash)
        if entry is None or entry[1] < time.monotonic():
            return None
        return entry[0]

    def put(self, key_hash: str, project_id: str) -> None:
        if self.ttl <= 0:
            return
        with self._lock:
            if len(self._entries) > 10_000:
                self._entries.clear()
            self._entries[key_hash] = (project_id, time.monotonic() + self.ttl)

    def forget(self, key_hash: str) -> None:
        with self._lock:
            self._entries.pop(key_hash, None)


def admin_caller(token: str, admin_key: str) -> Caller | None:
    if hmac.compare_digest(token.encode(), admin_key.encode()):
        return Caller(projects.DEFAULT_PROJECT_ID, is_admin=True)
    return None


async def project_caller(reader: Reader, token: str, cache: KeyCache | None = None) -> Caller:
    """The project of a project key, from the cache or the database. Raises Unauthorized."""
    key_hash = projects.hash_key(token)
    if cache is not None and (project_id := cache.get(key_hash)) is not None:
        return Caller(project_id)
    found = await projects.read_key_for_hash(reader, key_hash)
    if found is None or not hmac.compare_digest(found[0], key_hash):
        raise Unauthorized(f"Incorrect API key provided: {token[:6]}...")
    if cache is not None:
        cache.put(key_hash, found[1])
    return Caller(found[1])


async def authenticate(
    reader: Reader, admin_key: str, authorization: str | None, cache: KeyCache | None = None
) -> Caller:
    """The caller of a request's Authorization header: the admin, or a project key's project."""
    token = bearer_token(authorization)
    return admin_caller(token, admin_key) or await project_caller(reader, token, cache)
