"""Where each object lives in the store: the one module that builds and parses object keys.

    files/{file_id}                                          an uploaded file, or a job's result file
    jobs/{job_id}/checkpoints/{checkpoint_id}/adapter.tar.gz  a checkpoint's adapter (its row names this)
    jobs/{job_id}/checkpoints/{checkpoint_id}/state.tar.gz    the trainer state to resume from, beside it
    jobs/{job_id}/artifacts/{name}.tar.gz                     a finished job's artifact
    tokcache/{file_sha256}/{entry}                            a tokenized dataset (training/tokcache.py)
    uploads/{upload_id}/parts/{part_id}                       one part of an Uploads API upload

Keys are relative, `/`-separated, and made only of ids the service generated and fixed names.
"""

from __future__ import annotations

from typing import NamedTuple

FILES = "files/"
JOBS = "jobs/"
UPLOADS = "uploads/"


def file_key(file_id: str) -> str:
    return f"{FILES}{file_id}"


def upload_prefix(upload_id: str) -> str:
    """Everything an Uploads API upload wrote: its parts."""
    return f"{UPLOADS}{upload_id}/"


def upload_part_key(upload_id: str, part_id: str) -> str:
    return f"{upload_prefix(upload_id)}parts/{part_id}"


def job_prefix(job_id: str) -> str:
    """Everything a job wrote: its checkpoints and artifacts."""
    return f"{JOBS}{job_id}/"


def job_checkpoints_prefix(job_id: str) -> str:
    return f"{job_prefix(job_id)}checkpoints/"


def artifact_key(job_id: str, name: str) -> str:
    return f"{job_prefix(job_id)}artifacts/{name}.tar.gz"


class CheckpointKeys(NamedTuple):
    """The objects of one checkpoint. `adapter` is what the checkpoint row stores; `parse` goes back."""

    job_id: str
    checkpoint_id: str

    @property
    def prefix(self) -> str:
        return f"{job_checkpoints_prefix(self.job_id)}{self.checkpoint_id}/"

    @property
    def adapter(self) -> str:
        return f"{self.prefix}adapter.tar.gz"

    @property
    def state(self) -> str:
        return f"{self.prefix}state.tar.gz"

    @classmethod
    def parse(cls, key: str) -> CheckpointKeys:
        """The checkpoint whose adapter or state object `key` is. Raises ValueError for any other key."""
        parts = key.split("/")
        if (
            len(parts) != 5
            or f"{parts[0]}/" != JOBS
            or parts[2] != "checkpoints"
            or parts[4] not in ("adapter.tar.gz", "state.tar.gz")
            or not parts[1]
            or not parts[3]
        ):
            raise ValueError(f"{key!r} is not a checkpoint's object key")
        return cls(parts[1], parts[3])


TOKCACHE = "tokcache/"


def tokenization_cache_prefix(file_sha256: str) -> str:
    """Every tokenization cache entry made from the file with this sha256."""
    return f"{TOKCACHE}{file_sha256}/"


def tokenization_cache_key(file_sha256: str, entry: str) -> str:
    """One entry (a file name made by tuneforge.training.tokcache) of a file's tokenization cache."""
    if not file_sha256.isalnum() or "/" in entry or entry.startswith("."):
        raise ValueError(f"not a tokenization cache entry: {file_sha256!r}/{entry!r}")
    return f"{tokenization_cache_prefix(file_sha256)}{entry}"
