"""Adapter archives from the object store, unpacked once into a local cache directory."""

from __future__ import annotations

import hashlib
import shutil
import tarfile
import tempfile
import threading
from pathlib import Path

from tuneforge.storage import ObjectStore


def cache_name(storage_key: str) -> str:
    """A name for a stored archive that PEFT accepts as an adapter name and a directory name."""
    return "a" + hashlib.sha256(storage_key.encode()).hexdigest()[:20]


class AdapterFetcher:
    """Downloads and unpacks `storage_key` into `root/<cache_name>/` (once; concurrent callers for
    the same key wait for the one download)."""

    def __init__(self, store: ObjectStore, root: Path) -> None:
        self.store = store
        self.root = root
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def fetch(self, storage_key: str) -> Path:
        name = cache_name(storage_key)
        target = self.root / name
        with self._guard:
            lock = self._locks.setdefault(name, threading.Lock())
        with lock:
            if (target / ".complete").exists():
                return target
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=self.root, prefix=".fetch-") as scratch:
                archive = Path(scratch) / "archive.tar.gz"
                self.store.download(storage_key, archive)
                unpacked = Path(scratch) / "unpacked"
                with tarfile.open(archive, "r:gz") as tar:
                    tar.extractall(unpacked, filter="data")
                (unpacked / ".complete").touch()
                shutil.rmtree(target, ignore_errors=True)
                unpacked.rename(target)
            return target

    def discard(self, storage_key: str) -> None:
        """Deletes the unpacked copy of `storage_key` (a later `fetch` downloads it again)."""
        name = cache_name(storage_key)
        with self._guard:
            lock = self._locks.setdefault(name, threading.Lock())
        with lock:
            shutil.rmtree(self.root / name, ignore_errors=True)
