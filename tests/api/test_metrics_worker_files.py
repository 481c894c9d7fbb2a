"""A worker's multiprocess metric files (tuneforge/metrics.py): each pool process writes its own
set, one per job run, and the worker's main process folds the sets of dead processes into one
archive set (`compact_dead_processes`), so the directory does not grow with every job while the
sums it serves stay what they were. The pool processes here are real processes recording through
tuneforge.metrics, as a worker's do."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from tuneforge.metrics import compact_dead_processes

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

# One job run's records, then (with "wait") a line on stdout and a wait for stdin to close.
RECORD = """
import sys
from tuneforge import metrics
metrics.record_training_step("gpu", 3, 100, 50.0)
metrics.record_lease_renewal(True)
metrics.record_first_step(4.0)
metrics.record_run_finished("gpu", "succeeded", 20.0) if sys.argv[1] == "done" else None
metrics.record_webhook_delivery("delivered")
if sys.argv[1] == "wait":
    print("recorded", flush=True)
    sys.stdin.read()
"""


def record(directory: Path, mode: str) -> subprocess.Popen[str]:
    """A process that records one run into `directory`: `done` (a finished run) and `crashed`
    (killed mid-run: its tokens/s gauge is still set) exit; `wait` stays alive until closed."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    process = subprocess.Popen(
        [sys.executable, "-c", RECORD, mode],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    if mode == "wait":
        assert process.stdout is not None and process.stdout.readline() == "recorded\n"
    else:
        assert process.wait(timeout=120) == 0
    return process


def scrape(directory: Path) -> Samples:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for sample in family.samples
    }


def pids(directory: Path) -> set[str]:
    return {path.stem.rpartition("_")[2] for path in directory.glob("*.db")}


@pytest.fixture
def live(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    process = record(tmp_path, "wait")
    yield process
    process.communicate(timeout=60)


def test_dead_processes_files_fold_into_one_archive_and_the_sums_stay(
    tmp_path: Path, live: subprocess.Popen[str]
) -> None:
    dead = [record(tmp_path, "done"), record(tmp_path, "crashed")]
    assert pids(tmp_path) == {str(p.pid) for p in [live, *dead]}
    before = scrape(tmp_path)
    assert before[("tuneforge_training_steps_total", (("queue", "gpu"),))] == 9
    assert before[("tuneforge_training_tokens_per_second", (("queue", "gpu"),))] == 100  # live + crashed

    assert compact_dead_processes(tmp_path) > 0
    assert pids(tmp_path) == {str(live.pid), "archive"}
    after = scrape(tmp_path)
    gauge = ("tuneforge_training_tokens_per_second", (("queue", "gpu"),))
    assert after.pop(gauge) == 50  # the crashed process's gauge went with it; the live one's stays
    before.pop(gauge)
    assert after == before
    assert after[("tuneforge_job_time_to_first_step_seconds_count", ())] == 3
    assert after[("tuneforge_worker_heartbeat_timestamp_seconds", ())] > 0

    # a later dead process adds to the archive; compacting twice changes nothing more
    record(tmp_path, "done")
    compact_dead_processes(tmp_path)
    assert compact_dead_processes(tmp_path) == 0
    assert pids(tmp_path) == {str(live.pid), "archive"}
    again = scrape(tmp_path)
    assert again[("tuneforge_training_steps_total", (("queue", "gpu"),))] == 12
    assert again[("tuneforge_webhook_deliveries_total", (("outcome", "delivered"),))] == 4
    assert again[("tuneforge_job_run_duration_seconds_count", (("outcome", "succeeded"),))] == 2
    assert (
        again[("tuneforge_job_run_duration_seconds_bucket", (("le", "30.0"), ("outcome", "succeeded")))] == 2
    )
