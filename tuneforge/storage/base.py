from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse

CHUNK_SIZE = 1 << 20


class ObjectNotFound(KeyError):
    """No object under that key."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int


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

    def presigned_url(self, key: str, expires_in: int = 3600) -> str | None:
        """A URL a client can GET without credentials, where the backend has such a thing."""
        return None

    def check(self) -> None:
        """Raises if the store cannot be reached (used by /readyz)."""
        self.exists("readyz-probe")


def open_store(url: str, endpoint_url: str | None = None) -> ObjectStore:
    """The store a `TUNEFORGE_STORAGE_URL` names: `file:///path` or `s3://bucket/prefix`."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        from tuneforge.storage.filesystem import FilesystemStore

        return FilesystemStore(Path(parsed.netloc + parsed.path))
    if parsed.scheme == "s3":
        from tuneforge.storage.s3 import S3Store  # type: ignore[import-not-found,unused-ignore]

        return S3Store(bucket=parsed.netloc, prefix=parsed.path.strip("/"), endpoint_url=endpoint_url)
    raise ValueError(f"unsupported storage URL {url!r}: use file:///path or s3://bucket/prefix")
