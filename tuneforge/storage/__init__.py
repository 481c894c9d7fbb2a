"""The object store: one small interface, a filesystem backend and an S3 backend.

Keys are `/`-separated relative paths such as `files/file-abc` or `jobs/ftjob-x/adapter.tar.gz`.
Bytes move in chunks; nothing here holds a whole object in memory.
"""

from __future__ import annotations

from tuneforge.storage.base import ObjectInfo, ObjectNotFound, ObjectStore, open_store

__all__ = ["ObjectInfo", "ObjectNotFound", "ObjectStore", "open_store"]
