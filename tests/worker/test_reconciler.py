"""One bad job never stops a reconcile pass: a send that raises, or a job that raises while it is
examined, is logged and listed, and every other job is still taken back or sent again. The
reconciler runs in-process here against the module's PostgreSQL database."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

import tuneforge.worker.reconciler as reconciler
from tuneforge.db import session_scope, utcnow
from tuneforge.models.job import Job, JobStatus

from .helpers import events, get_job, seed_job
from .procs import Services


def _age(services: Services, job_id: str, *, running: bool = False) -> None:
    """Makes a job look forgotten: untouched for an hour (and, running, its lease long gone)."""
    past = utcnow() - timedelta(hours=1)
    with session_scope(services.sessions) as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.updated_at = past
        if running:
            job.status = JobStatus.RUNNING.value
            job.attempt = 1
            job.lease_owner = "gone-worker"
            job.lease_expires_at = past


def test_a_failing_send_and_a_failing_job_do_not_stop_the_pass(
    services: Services, qa_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    waiting = [seed_job(services, qa_path) for _ in range(4)]
    lost = [seed_job(services, qa_path) for _ in range(3)]
    for job_id in waiting:
        _age(services, job_id)
    for job_id in lost:
        _age(services, job_id, running=True)
    poisoned_send, poisoned_job = waiting[1], lost[0]

    real_latest = reconciler.latest_checkpoint

    def latest_checkpoint(session, job_id):  # type: ignore[no-untyped-def]
        if job_id == poisoned_job:
            raise RuntimeError("this job cannot be examined")
        return real_latest(session, job_id)

    monkeypatch.setattr(reconciler, "latest_checkpoint", latest_checkpoint)
    sent: list[str] = []

    def send(job_id: str, queue: str) -> None:
        if job_id == poisoned_send:
            raise RuntimeError("WRONGTYPE Operation against a key holding the wrong kind of value")
        sent.append(job_id)

    done = reconciler.reconcile(services.settings(), services.sessions, send)

    assert done["errors"] == [poisoned_job]
    assert done["send_failed"] == [poisoned_send]
    assert sorted(done["requeued"]) == sorted(lost[1:])
    assert sorted(done["resent"]) == sorted(waiting)
    assert sorted(sent) == sorted([*lost[1:], *(j for j in waiting if j != poisoned_send)])
    for job_id in lost[1:]:
        assert get_job(services, job_id).status == JobStatus.QUEUED
        assert any("was lost" in e.message for e in events(services, job_id))
    # The job that raised is untouched (its transaction rolled back), for the next pass.
    stuck = get_job(services, poisoned_job)
    assert stuck.status == JobStatus.RUNNING and stuck.lease_owner == "gone-worker"

    monkeypatch.setattr(reconciler, "latest_checkpoint", real_latest)
    _age(services, poisoned_send)
    again = reconciler.reconcile(
        services.settings(), services.sessions, lambda job_id, queue: sent.append(job_id)
    )
    assert poisoned_job in again["requeued"] and poisoned_send in again["resent"]
    assert not again["errors"] and not again["send_failed"]
