"""Claim, lease, events, checkpoints, cancel, pause, faults: real PostgreSQL, Redis, Celery worker
processes and training processes, with a stand-in training callable (tests/worker/standin.py)
so that these run in seconds. The real training runs in tests/e2e."""

from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path

import psutil
import pytest

from tuneforge.db import session_scope
from tuneforge.models.job import JobStatus, cancel_job, pause_job
from tuneforge.models.job import get_job_any_project as load_job
from tuneforge.worker.celery_app import RUN_JOB_TASK, make_celery

from .helpers import artifacts, checkpoints, events, get_job, metric_steps, seed_job, status
from .procs import Services, training_processes, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def send(services: Services):  # type: ignore[no-untyped-def]
    import os

    saved = dict(os.environ)
    os.environ.update(services.env)
    app = make_celery(services.settings())
    os.environ.clear()
    os.environ.update(saved)

    def _send(job_id: str) -> None:
        app.send_task(RUN_JOB_TASK, args=[job_id], queue="gpu")

    return _send


@pytest.fixture(scope="module")
def worker(services: Services):  # type: ignore[no-untyped-def]
    process = services.worker(extra_env={"STANDIN_STEP_SECONDS": "0.3"})
    yield process
    services.stop(process)


def _terminal(services: Services, job_id: str) -> str | None:
    value = status(services, job_id)
    return value if value in ("succeeded", "failed", "cancelled", "paused") else None


def test_job_runs_once_with_batched_events_checkpoints_and_artifacts(
    services: Services, worker: object, send, qa_path: Path
) -> None:  # type: ignore[no-untyped-def]
    job_id = seed_job(services, qa_path, max_steps=8, save_every=2)
    send(job_id)
    send(job_id)  # a duplicated message: one run
    assert wait_for(lambda: _terminal(services, job_id), 180, "the job to finish", services) == "succeeded"
    job = get_job(services, job_id)
    assert job.attempt == 1
    assert [e.message for e in events(services, job_id)].count("Fine-tuning job started (attempt 1).") == 1
    assert metric_steps(services, job_id) == list(range(1, 9))
    assert [c.step_number for c in checkpoints(services, job_id)] == [6, 8]  # keep 2
    assert job.fine_tuned_model and job.fine_tuned_model.startswith("ft:tuneforge/tiny-chat:default:test:")
    assert job.trained_tokens == 80
    assert job.progress and job.progress["step"] == 8
    assert job.result_files and job.result_files[0].startswith("file-")
    adapter = artifacts(services, job_id)["adapter"]
    assert adapter.bytes > 0 and len(adapter.sha256) == 64
    assert job.lease_owner is None


def test_cancel_while_running_stops_within_a_step(
    services: Services, worker: object, send, qa_path: Path
) -> None:  # type: ignore[no-untyped-def]
    job_id = seed_job(services, qa_path, max_steps=200, save_every=50)
    send(job_id)
    wait_for(lambda: len(metric_steps(services, job_id)) >= 3, 120, "training to start", services)
    with session_scope(services.sessions) as session:
        job = load_job(session, job_id)
        assert job is not None
        cancel_job(session, job)
    assert wait_for(lambda: _terminal(services, job_id), 120, "the cancel", services) == "cancelled"
    # Stopped, not run out: 200 steps of 0.3 s would take a minute.
    assert max(metric_steps(services, job_id)) < 200
    wait_for(lambda: not _busy_children(services), 120, "no training process left", services)


def _busy_children(services: Services) -> list[object]:
    """This module's training processes that received a job (warm spares waiting for one are
    fine; other test runs on the machine are not ours to count)."""
    ours = {p.pid for p in services.processes}
    busy = []
    for process in training_processes():
        try:  # one that exits while it is looked at is not busy (CI: NoSuchProcess here)
            if ours & {a.pid for a in process.parents()} and process.cpu_percent(0.05) > 5:
                busy.append(process)
        except psutil.Error:
            continue
    return busy


def test_pause_then_resume_ends_with_planned_steps(
    services: Services, worker: object, send, qa_path: Path
) -> None:  # type: ignore[no-untyped-def]
    from tuneforge.models.job import resume_job

    # 40 steps of 0.3 s: the pause, asked for after step 3, lands long before the end.
    job_id = seed_job(services, qa_path, max_steps=40, save_every=100)
    send(job_id)
    wait_for(lambda: len(metric_steps(services, job_id)) >= 3, 120, "training to start", services)
    with session_scope(services.sessions) as session:
        job = load_job(session, job_id)
        assert job is not None
        pause_job(session, job)
    assert wait_for(lambda: _terminal(services, job_id), 120, "the pause", services) == "paused"
    paused_at = checkpoints(services, job_id)[-1].step_number
    assert 3 <= paused_at < 40
    with session_scope(services.sessions) as session:
        job = load_job(session, job_id)
        assert job is not None
        resume_job(session, job)
    send(job_id)
    assert wait_for(lambda: _terminal(services, job_id), 180, "the resumed run", services) == "succeeded"
    steps = metric_steps(services, job_id)
    assert steps == list(range(1, 41)), steps
    assert get_job(services, job_id).progress["step"] == 40  # type: ignore[index]


def test_a_job_on_more_devices_than_the_worker_has_goes_back_to_its_queue(
    services: Services, worker: object, send, qa_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """This worker has one device: a `hardware.count = 2` job is handed back to its queue (for a
    worker that has two) with a warning, not run on one device and not a spent attempt."""
    job_id = seed_job(services, qa_path, extra={"hardware": {"count": 2, "strategy": "ddp"}})
    send(job_id)
    said = "This worker has 1 device(s) and the job asks for 2: back in its queue."
    wait_for(lambda: said in [e.message for e in events(services, job_id)], 120, "the hand-back", services)
    job = get_job(services, job_id)
    assert job.attempt == 0 and job.lease_owner is None, (job.attempt, job.lease_owner)
    assert metric_steps(services, job_id) == []  # nothing trained on the one device
    with session_scope(services.sessions) as session:  # no worker here has two: stop its round trips
        cancel_job(session, load_job(session, job_id))  # type: ignore[arg-type]
    assert wait_for(lambda: _terminal(services, job_id), 60, "the cancel", services) == "cancelled"


def test_validating_files_then_queued_then_run(
    services: Services, worker: object, send, qa_path: Path
) -> None:  # type: ignore[no-untyped-def]
    job_id = seed_job(services, qa_path, status=JobStatus.VALIDATING_FILES, max_steps=3, save_every=3)
    send(job_id)
    assert wait_for(lambda: _terminal(services, job_id), 180, "the job", services) == "succeeded"
    texts = [e.message for e in events(services, job_id)]
    assert texts[0].startswith("Files validated: 32 training examples"), texts
    assert texts.index("Job queued.") < texts.index("Fine-tuning job started (attempt 1).")


def test_validation_failure_names_the_problem(
    services: Services, worker: object, send, qa_path: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    job_id = seed_job(
        services,
        qa_path,
        status=JobStatus.VALIDATING_FILES,
        extra={"method": {"type": "supervised", "supervised": {"hyperparameters": {"max_seq_length": 8}}}},
    )
    send(job_id)
    assert wait_for(lambda: _terminal(services, job_id), 180, "the validation", services) == "failed"
    job = get_job(services, job_id)
    assert job.error is not None and job.error["code"] == "invalid_training_file"
    assert "max_seq_length=8" in job.error["message"] and job.error["param"] == "training_file"
    assert job.attempt == 0  # never claimed for training


def test_a_dead_spare_training_process_does_not_cost_the_job(
    services: Services, worker: subprocess.Popen[bytes], send, qa_path: Path
) -> None:  # type: ignore[no-untyped-def]
    def spares() -> list[psutil.Process]:
        return [p for p in training_processes() if worker.pid in {a.pid for a in p.parents()}]

    victims = wait_for(spares, 120, "the idle worker's spare training process", services)
    for victim in victims:
        victim.kill()
    job_id = seed_job(services, qa_path, max_steps=3, save_every=3)
    send(job_id)
    assert wait_for(lambda: _terminal(services, job_id), 180, "the job", services) == "succeeded"


# Last: this one kills the module's worker.
def test_worker_killed_mid_run_resumes_on_a_new_worker(
    services: Services, worker: object, send, qa_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL a few steps after a checkpoint: the next attempt resumes from that checkpoint and
    trains those steps again, but the job's events keep one metrics point per step and its
    progress never goes back."""
    beat = services.beat()
    try:
        job_id = seed_job(services, qa_path, max_steps=20, save_every=10)  # killed long before step 20
        send(job_id)

        def past_a_checkpoint() -> bool:
            stored = checkpoints(services, job_id)
            return bool(stored) and max(metric_steps(services, job_id)) >= stored[-1].step_number + 2

        wait_for(past_a_checkpoint, 120, "steps logged after a checkpoint", services)
        services.stop(worker, signal.SIGKILL)  # type: ignore[arg-type]
        last = checkpoints(services, job_id)[-1].step_number
        before = metric_steps(services, job_id)
        assert max(before) > last, (last, before)  # the next attempt repeats steps already logged
        progress_seen = [get_job(services, job_id).progress["step"]]  # type: ignore[index]

        def finished() -> str | None:
            progress_seen.append((get_job(services, job_id).progress or {}).get("step"))
            return _terminal(services, job_id)

        replacement = services.worker(extra_env={"STANDIN_STEP_SECONDS": "0.05"})
        try:
            assert wait_for(finished, 180, "recovery", services) == "succeeded"
        finally:
            services.stop(replacement)
        job = get_job(services, job_id)
        assert job.attempt == 2
        steps = metric_steps(services, job_id)
        assert steps == list(range(1, 21)), (last, before, steps)
        assert steps[: len(before)] == before
        seen = [s for s in progress_seen if s is not None]
        assert seen == sorted(seen), seen
        assert job.progress and job.progress["step"] == 20
        texts = [e.message for e in events(services, job_id)]
        assert any("was lost" in t for t in texts)
        assert f"Fine-tuning job started (attempt 2) from checkpoint at step {last}." in texts
    finally:
        services.stop(beat)


def test_child_crash_fails_with_a_short_message_and_an_incident_in_the_worker_log(
    services: Services, send, qa_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """The tenant sees a code, the error's first line and an incident id; the traceback and the
    training log's last lines are in the worker's log under that id, not in the job's events."""
    process = services.worker(extra_env={"STANDIN_CRASH_AT": "3"})
    try:
        job_id = seed_job(services, qa_path, max_steps=10, save_every=100)
        send(job_id)
        assert wait_for(lambda: _terminal(services, job_id), 120, "the failure", services) == "failed"
    finally:
        services.stop(process)
    job = get_job(services, job_id)
    assert job.error and job.error["code"] == "training_error"
    assert job.error["message"].startswith("RuntimeError: stand-in crashed at step 3 (incident inc-")
    incident = re.search(r"incident (inc-[0-9a-f]+)", job.error["message"]).group(1)  # type: ignore[union-attr]
    shown = [(e.message, e.data) for e in events(services, job_id)]
    leaks = ("Traceback", "about to crash", str(services.tmp), "tests/worker/standin.py", "site-packages")
    assert not any(leak in str(item) for item in shown for leak in leaks), shown
    started = next(data for text, data in shown if text.startswith("Training started"))
    assert started and "worker" not in started and "training_pid" not in started
    failed = [data for text, data in shown if text.startswith("Fine-tuning job failed")]
    assert failed == [{"code": "training_error", "incident": incident}]
    worker_log = "".join(path.read_text(errors="replace") for path in services.tmp.glob("worker-*.log"))
    at = worker_log.index(f"incident {incident}")
    assert "Traceback" in worker_log[at:] and "about to crash" in worker_log[at:]
    assert job.status == JobStatus.FAILED


def test_a_diverging_run_fails_with_non_finite_loss(services: Services, send, qa_path: Path) -> None:  # type: ignore[no-untyped-def]
    process = services.worker(extra_env={"STANDIN_DIVERGE_AT": "2"})
    try:
        job_id = seed_job(services, qa_path, max_steps=10, save_every=100)
        send(job_id)
        assert wait_for(lambda: _terminal(services, job_id), 120, "the failure", services) == "failed"
    finally:
        services.stop(process)
    job = get_job(services, job_id)
    assert job.error and job.error["code"] == "non_finite_loss", job.error
    assert job.error["message"].startswith("NonFiniteLoss: training diverged at step 2 (grad_norm=nan)")
    assert job.fine_tuned_model is None
