"""The worker's side of the tokenization cache (tuneforge/training/tokcache.py): before a run, the
entries the object store holds for its files go into the run's local cache directory; once the
run has tokenized, the entries it added go to the store for the next validation, attempt or job.
The cache only saves time: a store that fails costs a tokenization, never the job."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from tuneforge.storage import ObjectStore
from tuneforge.storage.keys import tokenization_cache_key, tokenization_cache_prefix
from tuneforge.training import tokcache

log = logging.getLogger(__name__)


class StoreCache:
    """One run's local cache directory and what the store is known to hold of it."""

    def __init__(self, store: ObjectStore, directory: Path) -> None:
        self.store = store
        self.directory = directory
        self.known: set[str] = set()  # keys in the store: pulled, or pushed by this run
        directory.mkdir(parents=True, exist_ok=True)

    def pull(self, files: Iterable[Path | None]) -> int:
        """Downloads the store's entries for `files`; returns how many."""
        count = 0
        for path in files:
            if path is None:
                continue
            try:
                sha = tokcache.file_sha256(path)
                for info in list(self.store.list(tokenization_cache_prefix(sha))):
                    name = info.key.rsplit("/", 1)[-1]
                    target = self.directory / sha / name
                    if info.key in self.known or name.startswith(".") or target.exists():
                        continue
                    self.store.download(info.key, target)
                    self.known.add(info.key)
                    count += 1
            except Exception as error:
                log.warning("tokenization cache: could not fetch entries for %s: %s", path.name, error)
        return count

    def push(self) -> int:
        """Uploads the entries the run added; returns how many."""
        count = 0
        for entry in sorted(self.directory.glob("*/*")):
            if entry.name.startswith(".") or entry.parent.name.startswith(".") or not entry.is_file():
                continue
            try:
                key = tokenization_cache_key(entry.parent.name, entry.name)
                if key in self.known:
                    continue
                self.store.put_file(key, entry)
                self.known.add(key)
                count += 1
            except Exception as error:
                log.warning("tokenization cache: could not store %s: %s", entry.name, error)
        return count
