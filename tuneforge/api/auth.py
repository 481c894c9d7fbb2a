"""Bearer-key authentication: the admin key and project keys.

The admin key is `TUNEFORGE_ADMIN_KEY`, or one generated once into `<data_dir>/admin_key` (mode
0600). It acts as the built-in project `default` on the OpenAI endpoints and alone may call
/v1/admin/*. Project keys (`tf-...`) are stored as SHA-256 hashes and found by hash.
"""

from __future__ import annotations

import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session

from tuneforge.api.errors import Unauthorized
from tuneforge.config import Settings
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


def authenticate(session: Session, admin_key: str, authorization: str | None) -> Caller:
    token = bearer_token(authorization)
    if hmac.compare_digest(token.encode(), admin_key.encode()):
        return Caller(projects.DEFAULT_PROJECT_ID, is_admin=True)
    found = projects.key_for_hash(session, projects.hash_key(token))
    if found is None or not hmac.compare_digest(found[0], projects.hash_key(token)):
        raise Unauthorized(f"Incorrect API key provided: {token[:6]}...")
    return Caller(found[1])
