"""The object store: one small interface, a filesystem backend and an S3 backend.

Keys are `/`-separated relative paths; `tuneforge.storage.keys` builds and parses every one.
Bytes move in chunks; nothing here holds a whole object in memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from tuneforge.storage.base import ObjectInfo, ObjectNotFound, ObjectStore, PresignOptions
from tuneforge.storage.filesystem import FilesystemStore

if TYPE_CHECKING:
    from tuneforge.config import Settings

__all__ = [
    "ObjectInfo",
    "ObjectNotFound",
    "ObjectStore",
    "PresignOptions",
    "open_store",
    "store_from_settings",
]


def open_store(
    url: str, endpoint_url: str | None = None, presign: PresignOptions | None = None
) -> ObjectStore:
    """The store a `TUNEFORGE_STORAGE_URL` names: `file:///path` or `s3://bucket/prefix`."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return FilesystemStore(Path(parsed.netloc + parsed.path))
    if parsed.scheme == "s3":
        # boto3 takes a while to import: only processes that use S3 pay for it.
        from tuneforge.storage.s3 import S3Store

        return S3Store(
            bucket=parsed.netloc,
            prefix=parsed.path.strip("/"),
            endpoint_url=endpoint_url,
            presign=presign or PresignOptions(),
        )
    raise ValueError(f"unsupported storage URL {url!r}: use file:///path or s3://bucket/prefix")


def store_from_settings(settings: Settings) -> ObjectStore:
    """The configured store, with the settings of the download URLs it hands to clients."""
    secret = settings.s3_presign_secret_access_key
    presign = PresignOptions(
        public_endpoint_url=settings.s3_public_endpoint_url,
        expires_in=settings.s3_presign_expires_seconds,
        access_key_id=settings.s3_presign_access_key_id,
        secret_access_key=secret.get_secret_value() if secret else None,
    )
    return open_store(settings.storage_url, settings.s3_endpoint_url, presign)
