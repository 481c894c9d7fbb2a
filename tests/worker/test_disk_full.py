"""A full disk fails the job as `disk_full`, with a message that says so, wherever the worker
runs out of space: archiving a checkpoint, in the training process, downloading the job's files.
Before, such jobs ended as "the job's worker was lost 3 times". The worker's scratch directory
is a 1 MiB tmpfs (mounting one needs root; the test is skipped without it)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tuneforge.models.job import JobStatus
from tuneforge.worker.child import _error_code
from tuneforge.worker.incidents import is_disk_full

from .helpers import events, get_job, seed_job, sender, status
from .procs import Services, wait_for

pytestmark = pytest.mark.slow

BALLAST = 600_000  # bytes of incompressible "optimizer state" in each stand-in checkpoint


@pytest.fixture(scope="module")
def small_disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    mount = tmp_path_factory.mktemp("small-disk")
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a 1 MiB tmpfs here: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.fixture(scope="module")
def worker(services: Services, small_disk: Path):  # type: ignore[no-untyped-def]
    process = services.worker(
        extra_env={"TUNEFORGE_WORK_DIR": str(small_disk), "STANDIN_CHECKPOINT_BYTES": str(BALLAST)}
    )
    yield process
    services.stop(process)


@pytest.fixture(scope="module")
def send(services: Services):  # type: ignore[no-untyped-def]
    return sender(services)


def _fill(disk: Path, leave: int) -> Path:
    """Takes the disk's free space down to about `leave` bytes."""
    filler = disk / "filler"
    stat = os.statvfs(disk)
    free = stat.f_bavail * stat.f_frsize
    with filler.open("ab") as handle:
        handle.write(b"\0" * max(0, free - leave))
    return filler


def _fails_with_disk_full(services: Services, job_id: str) -> None:
    assert wait_for(lambda: status(services, job_id) in ("failed", "succeeded"), 120, "the job", services)
    job = get_job(services, job_id)
    assert job.status == "failed" and job.error is not None, (job.status, job.error)
    assert job.error["code"] == "disk_full", job.error
    assert job.error["message"].startswith("the worker ran out of disk space (no space left on device)")
    assert job.attempt == 1  # failed at once, not retried as a lost worker
    assert not any("was lost" in e.message for e in events(services, job_id))


def test_archiving_a_checkpoint(services: Services, worker: object, send, qa_path: Path) -> None:  # type: ignore[no-untyped-def]
    job_id = seed_job(services, qa_path, max_steps=4, save_every=2)
    send(job_id)
    _fails_with_disk_full(services, job_id)


def test_in_the_training_process(
    services: Services, worker: object, send, qa_path: Path, small_disk: Path
) -> None:  # type: ignore[no-untyped-def]
    filler = _fill(small_disk, leave=BALLAST // 3)  # room for the inputs, not for a checkpoint
    try:
        job_id = seed_job(services, qa_path, max_steps=4, save_every=2)
        send(job_id)
        _fails_with_disk_full(services, job_id)
    finally:
        filler.unlink()


def test_downloading_the_files(
    services: Services, worker: object, send, qa_path: Path, small_disk: Path
) -> None:  # type: ignore[no-untyped-def]
    filler = _fill(small_disk, leave=0)
    try:
        job_id = seed_job(services, qa_path, max_steps=4, save_every=2)
        send(job_id)
        _fails_with_disk_full(services, job_id)
        # The failed job's clean-up freed what it had written: fill the disk again (a new pool
        # process's spare used to, by accident, with its start-up log; a forked one writes none).
        _fill(small_disk, leave=0)
        validating = seed_job(services, qa_path, status=JobStatus.VALIDATING_FILES)
        send(validating)
        assert wait_for(
            lambda: status(services, validating) != "validating_files", 120, "validation", services
        )
    finally:
        filler.unlink()
    job = get_job(services, validating)
    assert job.status == "failed" and job.error is not None and job.error["code"] == "disk_full", job.error
    assert job.error["message"].startswith(
        "could not validate the files: the worker ran out of disk space (no space left on device)"
    )


def test_enospc_is_recognised_through_wrappers() -> None:
    import errno

    full = OSError(errno.ENOSPC, "No space left on device")
    assert is_disk_full(full) and _error_code(full) == "disk_full"
    try:
        try:
            raise full
        except OSError as error:
            raise RuntimeError("could not store the checkpoint") from error
    except RuntimeError as wrapped:
        assert is_disk_full(wrapped) and _error_code(wrapped) == "disk_full"
    torch_style = RuntimeError(
        "PytorchStreamWriter failed writing file data/0: file write failed: No space left on device"
    )
    assert _error_code(torch_style) == "disk_full"
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
