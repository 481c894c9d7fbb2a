"""`tuneforge serve` + a separate `tuneforge worker` + `tuneforge beat` on PostgreSQL, Redis and
an S3 server (moto), driven with the openai SDK; real tiny-chat training in every job."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.support import wait_for

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
    wait_for(
        lambda: (
            client.fine_tuning.jobs.checkpoints.list(job_id).data and len(metric_events(client, job_id)) >= 8
        ),
        300,
        "a checkpoint and 8 steps",
        distributed,
        interval=0.5,
    )
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
    adapter_dir = check_succeeded_job(distributed, job_id, tmp_path)
    load_adapter(tiny_chat_path, adapter_dir)


def test_cancel_running_job(distributed: Stack, qa_path: Path) -> None:
    client = distributed.sdk()
    job_id = create_job(
        client, qa_path, hyperparameters={"max_steps": 400, "batch_size": 4, "save_every_steps": 200}
    )
    wait_for(lambda: len(metric_events(client, job_id)) >= 2, 300, "2 steps", distributed, interval=0.3)
    client.fine_tuning.jobs.cancel(job_id)
    job = wait_job(client, job_id, timeout=300)
    assert job.status == "cancelled"
    assert max(m["step"] for m in metric_events(client, job_id)) < 400  # stopped, not run out
    assert_training_process_gone(distributed, job_id)


def assert_training_process_gone(stack: Stack, job_id: str) -> None:
    """The job's training processes (named in the worker's log, never in the job's events) end."""
    import re

    logs = "".join(path.read_text(errors="replace") for path in stack.tmp.rglob("*.log"))
    pids = [int(pid) for pid in re.findall(rf"job {job_id}: training started by \S+ in process (\d+)", logs)]
    assert pids
    wait_for(lambda: not any(_alive(pid) for pid in pids), 60, f"training processes {pids} to end")


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_pause_then_resume_continues_to_planned_steps(
    distributed: Stack, qa_path: Path, tiny_chat_path: Path, tmp_path: Path
) -> None:
    client = distributed.sdk()
    job_id = create_job(
        client,
        qa_path,
        hyperparameters={"max_steps": 120, "batch_size": 4, "learning_rate": 3e-3, "save_every_steps": 100},
    )
    wait_for(lambda: len(metric_events(client, job_id)) >= 3, 300, "3 steps", distributed, interval=0.3)
    client.fine_tuning.jobs.pause(job_id)
    paused = wait_job(client, job_id, timeout=300, until={"paused", "failed", "succeeded"})
    assert paused.status == "paused", paused.error
    stopped_at = max(c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job_id).data)
    assert 3 <= stopped_at < 120  # paused before the end, wherever the pause landed
    client.fine_tuning.jobs.resume(job_id)
    job = wait_job(client, job_id, timeout=300)
    assert job.status == "succeeded", (job.error, distributed.logs())
    steps = [m["step"] for m in metric_events(client, job_id)]
    assert steps[-1] == 120 and max(steps) == 120
    events = list(reversed(client.fine_tuning.jobs.list_events(job_id, limit=1000).data))
    resumed = next(i for i, e in enumerate(events) if e.message.startswith("Job resumed"))
    after = [e.data["step"] for e in events[resumed:] if e.type == "metrics" and e.data]
    assert after and min(after) == stopped_at + 1, (stopped_at, after)
    check_succeeded_job(distributed, job_id, tmp_path)


def test_queue_names_cannot_reach_the_brokers_keys(distributed: Stack, qa_path: Path) -> None:
    """`queue` names that are kombu's own Redis keys, the reconciler's queue or unknown are
    refused; the worker and the reconciler keep running and the next job runs; every key the
    broker writes carries the service's prefix."""
    import redis

    http = distributed.http()
    with qa_path.open("rb") as handle:
        file_id = http.post("/v1/files", files={"file": handle}, data={"purpose": "fine-tune"}).json()["id"]
    for queue in ("unacked", "unacked_index", "control", "celery", "elsewhere", "q" * 65):
        body = {"model": "tuneforge/tiny-chat", "training_file": file_id, "queue": queue}
        response = http.post("/v1/fine_tuning/jobs", json=body)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "queue"

    client = distributed.sdk()
    job_id = create_job(client, qa_path, hyperparameters={"max_steps": 2, "batch_size": 4})
    job = wait_job(client, job_id, timeout=300)
    assert job.status == "succeeded", (job.error, distributed.logs())
    for name in ("worker", "beat", "serve"):
        assert distributed.processes[name].poll() is None, (name, distributed.logs())
    assert not any("WRONGTYPE" in p.read_text(errors="replace") for p in distributed.tmp.rglob("*.log"))
    keys = [k.decode() for k in redis.Redis.from_url(distributed.env["TUNEFORGE_BROKER_URL"]).keys("*")]
    assert keys and all(k.startswith("tuneforge:") for k in keys), keys
