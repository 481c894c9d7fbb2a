"""Out-of-memory recovery and the tokenization cache, on real workers training tuneforge/tiny-chat.

The out-of-memory error is injected (TUNEFORGE_TEST_OOM_ABOVE_MICRO_BATCH, a test-only setting):
CPU memory cannot stand in for a GPU's. One worker injects above a micro-batch of 1, so a job with
batch_size 2 succeeds after one halving; another injects at every micro-batch (0), so a job climbs
the whole ladder and fails with `out_of_memory` and the estimator's advice; a third, started for
one test, injects only after step 2 (TUNEFORGE_TEST_OOM_AFTER_STEP), so the retry resumes from a
checkpoint. The jobs of the first worker share one file, so the retried run and a later job find
its tokenization in the cache.
Timings are reported (the start event's setup_seconds), never asserted."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tuneforge.models.job import Job, JobEvent

from .helpers import checkpoints, events, seed_job, sender
from .procs import Services, running_services
from .real_training import REAL_TRAINING_ENV, finished, send_to_queue, starts

pytestmark = pytest.mark.slow

ALL_OOM_QUEUE = "gpu-oom"
LATE_OOM_QUEUE = "gpu-oom-late"
JOB_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def services(
    pg_url: str,
    redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
    models_dir: Path,
    tiny_chat_path: Path,
) -> Iterator[Services]:
    with running_services(
        tmp_path_factory.mktemp("oom"), pg_url, redis_url, models_dir, REAL_TRAINING_ENV
    ) as svc:
        svc.worker(extra_env={"TUNEFORGE_TEST_OOM_ABOVE_MICRO_BATCH": "1"})
        svc.worker(queues=ALL_OOM_QUEUE, extra_env={"TUNEFORGE_TEST_OOM_ABOVE_MICRO_BATCH": "0"})
        yield svc


def _job(services: Services, data: Path, batch_size: int) -> str:
    hp = {"batch_size": batch_size, "max_steps": 3, "save_every_steps": 10, "n_epochs": 1}
    return seed_job(
        services, data, extra={"method": {"type": "supervised", "supervised": {"hyperparameters": hp}}}
    )


def _finished(services: Services, job_id: str) -> Job:
    return finished(services, job_id, JOB_TIMEOUT_S)


@pytest.fixture(scope="module")
def halved(services: Services, qa_path: Path) -> tuple[Job, list[JobEvent]]:
    job_id = _job(services, qa_path, batch_size=2)
    sender(services)(job_id)
    return _finished(services, job_id), events(services, job_id)


def test_an_injected_oom_succeeds_after_one_halving(halved: tuple[Job, list[JobEvent]]) -> None:
    job, rows = halved
    assert job.status == "succeeded", (job.error, [e.message for e in rows])
    assert job.attempt == 1  # the retry is no failed attempt
    retries = [e for e in rows if e.data and e.data.get("code") == "out_of_memory"]
    assert len(retries) == 1, [e.message for e in rows]
    assert retries[0].level == "warn"
    assert retries[0].message.startswith(
        "Out of memory with micro-batch 2: retrying with micro-batch 1 and gradient_accumulation_steps 2 "
        "(the same 2 examples per step)"
    )
    data = retries[0].data or {}
    assert data["micro_batch_size"] == 1 and data["gradient_checkpointing"] is False
    first, second = starts(rows)
    assert (
        first["hyperparameters"]["batch_size"],
        first["hyperparameters"]["gradient_accumulation_steps"],
    ) == (2, 1)
    assert (
        second["hyperparameters"]["batch_size"],
        second["hyperparameters"]["gradient_accumulation_steps"],
    ) == (1, 2)
    # The retried run reads the file's tokenization the first run stored.
    assert first["tokenization_cache"] == "miss" and second["tokenization_cache"] == "hit"
    assert not any(e.level == "error" for e in rows)


def test_a_later_job_on_the_same_file_hits_the_tokenization_cache(
    services: Services, qa_path: Path, halved: tuple[Job, list[JobEvent]]
) -> None:
    job_id = _job(services, qa_path, batch_size=1)
    sender(services)(job_id)
    job = _finished(services, job_id)
    assert job.status == "succeeded", job.error
    (start,) = starts(events(services, job_id))
    assert start["tokenization_cache"] == "hit", start
    assert set(start["tokenization_cache_entries"].values()) == {"hit"}
    miss = starts(halved[1])[0].get("setup_seconds")
    print(f"setup_seconds: first job (miss) {miss}, later job (hit) {start['setup_seconds']}")


def test_an_oom_at_every_micro_batch_fails_with_advice(services: Services, qa_path: Path) -> None:
    """batch_size 1 cannot be halved: the ladder's one rung is gradient checkpointing (the
    halving rung is the first test's)."""
    job_id = _job(services, qa_path, batch_size=1)
    send_to_queue(services, job_id, ALL_OOM_QUEUE)
    job = _finished(services, job_id)
    rows = events(services, job_id)
    assert job.status == "failed" and job.error is not None, [e.message for e in rows]
    assert job.error["code"] == "out_of_memory"
    message = job.error["message"]
    assert message.startswith(
        "out of device memory even with micro-batch 1 and gradient checkpointing; to fit: "
    )
    assert "qlora" in message and "(incident inc-" in message
    assert job.attempt == 1
    ladder = [
        e.message for e in rows if e.data and e.data.get("code") == "out_of_memory" and e.level == "warn"
    ]
    assert ladder == [
        "Out of memory with micro-batch 1: retrying with gradient checkpointing, from the start."
    ]
    assert [e.message for e in rows if e.level == "error"] == [f"Fine-tuning job failed: {message}"]


def test_an_oom_after_a_checkpoint_retries_from_that_checkpoint(services: Services, qa_path: Path) -> None:
    """The injected error strikes only after 2 steps (TUNEFORGE_TEST_OOM_AFTER_STEP): steps 1-2
    train at micro-batch 2 and are checkpointed, step 3 runs out of memory, and the halved run
    resumes from the checkpoint at step 2 instead of training steps 1-2 again."""
    worker = services.worker(
        queues=LATE_OOM_QUEUE,
        extra_env={"TUNEFORGE_TEST_OOM_ABOVE_MICRO_BATCH": "1", "TUNEFORGE_TEST_OOM_AFTER_STEP": "2"},
    )
    try:
        hp = {"batch_size": 2, "max_steps": 4, "save_every_steps": 2, "n_epochs": 1}
        job_id = seed_job(
            services, qa_path, extra={"method": {"type": "supervised", "supervised": {"hyperparameters": hp}}}
        )
        send_to_queue(services, job_id, LATE_OOM_QUEUE)
        job = _finished(services, job_id)
    finally:
        services.stop(worker)
    rows = events(services, job_id)
    assert job.status == "succeeded", (job.error, [e.message for e in rows])
    assert job.attempt == 1
    retries = [e for e in rows if e.data and e.data.get("code") == "out_of_memory"]
    assert [e.message for e in retries] == [
        "Out of memory with micro-batch 2: retrying with micro-batch 1 and gradient_accumulation_steps 2 "
        "(the same 2 examples per step), from its checkpoint at step 2."
    ]
    assert (retries[0].data or {})["resume_step"] == 2
    first, second = starts(rows)
    assert (first["hyperparameters"]["batch_size"], second["hyperparameters"]["batch_size"]) == (2, 1)
    begun = [e.message for e in rows if e.message.startswith("Training started")]
    assert [text.endswith("resuming after step 2.") for text in begun] == [False, True], begun
    # Steps 1-2 before the error, 3-4 after it: the retried run trained no step twice.
    retry_at = retries[0].seq
    steps = [(e.seq, int(e.data["step"])) for e in rows if e.type == "metrics" and e.data]
    assert [step for seq, step in steps if seq < retry_at] == [1, 2], steps
    assert [step for seq, step in steps if seq > retry_at] == [3, 4], steps
    assert [c.step_number for c in checkpoints(services, job_id)] == [2, 4]
    assert not any(e.level == "error" for e in rows)


def test_the_ladder() -> None:
    from tuneforge.worker.oom import MemoryPlan, next_plan, retry_spec

    halved = next_plan(MemoryPlan(), {"batch_size": 6, "gradient_accumulation_steps": 2, "n_epochs": 4})
    assert halved is not None and halved[0] == MemoryPlan(3, 4, False, halved=True)
    checkpointing = next_plan(halved[0], {})
    assert checkpointing is not None and checkpointing[0] == MemoryPlan(3, 4, True, halved=True)
    assert next_plan(checkpointing[0], {}) is None
    odd = next_plan(MemoryPlan(), {"batch_size": 5, "gradient_accumulation_steps": 1})
    assert odd is not None and odd[0].micro_batch == 1 and odd[0].accumulation == 5  # still 5 per step
    spec = {"method": {"type": "dpo", "dpo": {"hyperparameters": {"batch_size": "auto", "n_epochs": "auto"}}}}
    hp = retry_spec(spec, halved[0], {"n_epochs": 4, "save_every_steps": 7})["method"]["dpo"][
        "hyperparameters"
    ]
    assert hp == {"batch_size": 3, "gradient_accumulation_steps": 4, "n_epochs": 4, "save_every_steps": 7}
