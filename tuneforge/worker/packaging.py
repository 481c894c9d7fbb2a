"""Directories to and from `.tar.gz` archives with their contents at the root (the PEFT layout a
client unpacks and loads as is), and the sha256 of what is uploaded."""

from __future__ import annotations

import hashlib
import tarfile
from collections.abc import Callable
from pathlib import Path

from tuneforge.storage import ObjectStore
from tuneforge.storage.base import CHUNK_SIZE

# Trainer state that a resumed run needs but a downloaded adapter does not.
TRAINER_STATE_FILES = frozenset(
    {"optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.json", "training_args.bin"}
)


def _is_trainer_state(path: Path) -> bool:
    return path.name in TRAINER_STATE_FILES or path.name.startswith("rng_state")


def make_tarball(source: Path, target: Path, include: Callable[[Path], bool] | None = None) -> Path:
    """`source`'s files at the archive's root (no leading directory), deterministic order."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(target, "w:gz", compresslevel=6) as tar:
        for path in sorted(source.rglob("*")):
            if path.is_file() and (include is None or include(path)):
                tar.add(path, arcname=path.relative_to(source).as_posix(), recursive=False)
    return target


def adapter_only(path: Path) -> bool:
    return not _is_trainer_state(path)


def extract_tarball(archive: Path, target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(target, filter="data")
    return target


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK_SIZE):
            digest.update(chunk)
    return digest.hexdigest()


def upload(store: ObjectStore, key: str, path: Path) -> tuple[int, str]:
    """Uploads a file; returns (bytes, sha256)."""
    size = store.put_file(key, path)
    return size, sha256_of(path)
