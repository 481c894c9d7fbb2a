"""`tuneforge serve` + a separate `tuneforge worker` + `tuneforge beat` on PostgreSQL, Redis and
an S3 server (moto), driven with the openai SDK; real tiny-chat training in every job."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from .conftest import Stack
from .flows import check_succeeded_job, create_job, load_adapter, metric_events, wait_job

pytestmark = pytest.mark.slow

DATA = Path(__file__).resolve().parents[1] / "data"


def test_supervised_lora_with_s3_redirect(
    distributed: Stack, qa_path: Path, tiny_chat_path: Path, tmp_path: Path
) -> None:
    client = distributed.sdk()
    job_id = create_job(
        client,
        qa_path,
        hyperparameters={"max_steps": 8, "batch_size": 8, "learning_rate": 3e-3, "save_every_steps": 4},
    )
    wait_job(client, job_id, timeout=300)
    adapter_dir = check_succeeded_job(distributed, job_id, tmp_path, redirect=True)
    load_adapter(tiny_chat_path, adapter_dir)


def test_dpo_job(distributed: Stack, tiny_chat_path: Path, tmp_path: Path) -> None:
    client = distributed.sdk()
    job_id = create_job(
        client,
        DATA / "preferences.jsonl",
        method="dpo",
        hyperparameters={"max_steps": 6, "batch_size": 8, "learning_rate": 3e-3, "save_every_steps": 3},
    )
    wait_job(client, job_id, timeout=300)
    adapter_dir = check_succeeded_job(distributed, job_id, tmp_path)
    load_adapter(tiny_chat_path, adapter_dir)


def test_qlora_job(distributed: Stack, qa_path: Path, tiny_chat_path: Path, tmp_path: Path) -> None:
    client = distributed.sdk()
    job_id = create_job(
        client,
        qa_path,
        hyperparameters={"max_steps": 6, "batch_size": 8, "learning_rate": 3e-3, "save_every_steps": 3},
        adapter={"type": "qlora"},
    )
    wait_job(client, job_id, timeout=300)
    adapter_dir = check_succeeded_job(distributed, job_id, tmp_path)
    load_adapter(tiny_chat_path, adapter_dir)


def test_worker_and_training_killed_mid_run_resume_on_new_worker(
    distributed: Stack, qa_path: Path, tiny_chat_path: Path, tmp_path: Path
) -> None:
    client = distributed.sdk()
    job_id = create_job(
        client,
        qa_path,
        hyperparameters={"max_steps": 40, "batch_size": 4, "learning_rate": 3e-3, "save_every_steps": 5},
    )
    deadline = time.monotonic() + 300
    while not client.fine_tuning.jobs.checkpoints.list(job_id).data or len(metric_events(client, job_id)) < 8:
        assert time.monotonic() < deadline, distributed.logs()
        time.sleep(0.5)
    distributed.stop("worker", signal.SIGKILL)  # the worker, its pool process and the training process
    assert_training_process_gone(distributed, job_id)
    last_checkpoint = max(c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job_id).data)
    distributed.start("worker", "worker", "--queues", "gpu", "--concurrency", "1")

    job = wait_job(client, job_id, timeout=300)
    assert job.status == "succeeded", (job.error, distributed.logs())
    events = list(reversed(client.fine_tuning.jobs.list_events(job_id, limit=1000).data))  # oldest first
    restart = next(i for i, e in enumerate(events) if "attempt 2" in e.message)
    resumed_steps = [e.data["step"] for e in events[restart:] if e.type == "metrics" and e.data]
    assert resumed_steps and min(resumed_steps) > last_checkpoint, (last_checkpoint, resumed_steps)
    assert resumed_steps[-1] == 40
    adapter_dir = check_succeeded_job(distributed, job_id, tmp_path, resumed=True)
    load_adapter(tiny_chat_path, adapter_dir)


def test_cancel_running_job(distributed: Stack, qa_path: Path) -> None:
    client = distributed.sdk()
    job_id = create_job(
        client, qa_path, hyperparameters={"max_steps": 400, "batch_size": 4, "save_every_steps": 200}
    )
    deadline = time.monotonic() + 300
    while len(metric_events(client, job_id)) < 2:
        assert time.monotonic() < deadline, distributed.logs()
        time.sleep(0.3)
    last_step_seen = time.monotonic()
    client.fine_tuning.jobs.cancel(job_id)
    job = wait_job(client, job_id, timeout=60)
    assert job.status == "cancelled"
    assert time.monotonic() - last_step_seen < 10
    assert_training_process_gone(distributed, job_id)


def assert_training_process_gone(stack: Stack, job_id: str) -> None:
    """The job's training processes (named in the worker's log, never in the job's events) end."""
    import re

    import psutil

    logs = "".join(path.read_text(errors="replace") for path in stack.tmp.rglob("*.log"))
    pids = [int(pid) for pid in re.findall(rf"job {job_id}: training started by \S+ in process (\d+)", logs)]
    assert pids
    deadline = time.monotonic() + 10
    while any(psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie" for pid in pids):
        assert time.monotonic() < deadline, f"training process {pids} still alive"
        time.sleep(0.2)


def test_pause_then_resume_continues_to_planned_steps(
    distributed: Stack, qa_path: Path, tiny_chat_path: Path, tmp_path: Path
) -> None:
    client = distributed.sdk()
    job_id = create_job(
        client,
        qa_path,
        hyperparameters={"max_steps": 120, "batch_size": 4, "learning_rate": 3e-3, "save_every_steps": 100},
    )
    deadline = time.monotonic() + 300
    while len(metric_events(client, job_id)) < 3:
        assert time.monotonic() < deadline, distributed.logs()
        time.sleep(0.3)
    client.fine_tuning.jobs.pause(job_id)
    paused = wait_job(client, job_id, timeout=120, until={"paused", "failed", "succeeded"})
    assert paused.status == "paused", paused.error
    stopped_at = max(c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job_id).data)
    assert 3 <= stopped_at < 100
    client.fine_tuning.jobs.resume(job_id)
    job = wait_job(client, job_id, timeout=300)
    assert job.status == "succeeded", (job.error, distributed.logs())
    steps = [m["step"] for m in metric_events(client, job_id)]
    assert steps[-1] == 120 and max(steps) == 120
    events = list(reversed(client.fine_tuning.jobs.list_events(job_id, limit=1000).data))
    resumed = next(i for i, e in enumerate(events) if e.message.startswith("Job resumed"))
    after = [e.data["step"] for e in events[resumed:] if e.type == "metrics" and e.data]
    assert after and min(after) == stopped_at + 1, (stopped_at, after)
    check_succeeded_job(distributed, job_id, tmp_path, resumed=True)
