from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

CHUNK_SIZE = 1 << 20


class ObjectNotFound(KeyError):
    """No object under that key."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int


@dataclass(frozen=True)
class PresignOptions:
    """How download URLs handed to clients are made (S3). With a private endpoint configured and no
    `public_endpoint_url`, none are made: the API streams the bytes itself. A SigV4 URL always shows
    the access key id it was signed with; a dedicated read-only key pair keeps the service's own
    key id out of URLs."""

    public_endpoint_url: str | None = None
    expires_in: int = 300
    access_key_id: str | None = None
    secret_access_key: str | None = None


class ObjectStore(abc.ABC):
    """Where files, checkpoints and artifacts live. Implementations must be safe to share
    between threads of one process."""

    @abc.abstractmethod
    def put_stream(self, key: str, chunks: Iterable[bytes]) -> int:
        """Writes the chunks under `key` (replacing any object there); returns the byte count.
        A failure part-way leaves no object under `key`."""

    def put_file(self, key: str, path: Path) -> int:
        with path.open("rb") as handle:
            return self.put_stream(key, iter(lambda: handle.read(CHUNK_SIZE), b""))

    def put_bytes(self, key: str, data: bytes) -> int:
        return self.put_stream(key, [data])

    @abc.abstractmethod
    def open(self, key: str) -> BinaryIO:
        """A readable binary stream of the object. Raises ObjectNotFound."""

    def iter_chunks(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        with self.open(key) as handle:
            while chunk := handle.read(chunk_size):
                yield chunk

    def get_bytes(self, key: str) -> bytes:
        with self.open(key) as handle:
            return handle.read()

    def download(self, key: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        with tmp.open("wb") as out:
            for chunk in self.iter_chunks(key):
                out.write(chunk)
        tmp.replace(path)

    @abc.abstractmethod
    def stat(self, key: str) -> ObjectInfo:
        """Raises ObjectNotFound."""

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
        except ObjectNotFound:
            return False
        return True

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Removes the object; a missing key is not an error."""

    @abc.abstractmethod
    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Objects whose key starts with `prefix`, in key order."""

    def delete_prefix(self, prefix: str) -> None:
        for info in list(self.list(prefix)):
            self.delete(info.key)

    def remove_incomplete_writes(self, older_than: datetime) -> int:
        """Removes what writes that never finished left behind (a process killed mid-write),
        started before `older_than`; returns how many were removed."""
        return 0

    def presigned_url(self, key: str, expires_in: int | None = None) -> str | None:
        """A URL a client outside the service can GET without credentials, valid for `expires_in`
        seconds (the store's default when None); None where the backend has no such URL to give."""
        return None

    def check(self) -> None:
        """Raises if the store cannot be reached (used by /readyz)."""
        self.exists("readyz-probe")
