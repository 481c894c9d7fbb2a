"""Fine-tuning jobs through the official SDK: create (supervised, dpo, extensions), list with
paging and metadata filter, retrieve, cancel/pause/resume, events and checkpoints."""

from __future__ import annotations

from typing import Any

import openai
import pytest
from fastapi import FastAPI

from tests.api.conftest import ProjectCtx, mark_validated
from tuneforge.db import session_scope
from tuneforge.models import job as jobs
from tuneforge.models.checkpoint import add_checkpoint

MODEL = "tuneforge/tiny-chat"


def _set(app: FastAPI, job_id: str, **values: Any) -> None:
    with session_scope(app.state.sessionmaker) as session:
        job = session.get(jobs.Job, job_id)
        assert job is not None
        for name, value in values.items():
            setattr(job, name, value)


def test_create_supervised_job_with_extensions(project: ProjectCtx, chat_jsonl: str) -> None:
    file_id = project.upload(chat_jsonl)
    job = project.openai.fine_tuning.jobs.create(
        model=MODEL,
        training_file=file_id,
        validation_file=file_id,
        suffix="my-model",
        seed=7,
        metadata={"team": "search"},
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3, "batch_size": 4}}},
        extra_body={"adapter": {"type": "dora", "r": 8}, "export": ["merged"]},
    )
    assert job.id.startswith("ftjob-")
    assert job.object == "fine_tuning.job"
    assert job.status == "validating_files"
    assert job.model == MODEL
    assert job.training_file == file_id and job.validation_file == file_id
    assert job.organization_id == project.id
    assert job.seed == 7
    assert job.metadata == {"team": "search"}
    assert job.fine_tuned_model is None and job.finished_at is None and job.error is None
    assert job.result_files == [] and job.trained_tokens is None
    assert job.hyperparameters.n_epochs == 3 and job.hyperparameters.batch_size == 4
    assert job.method is not None and job.method.type == "supervised"
    assert job.method.supervised is not None
    raw = job.model_dump()
    assert raw["adapter"]["type"] == "dora" and raw["adapter"]["r"] == 8
    assert raw["export"] == ["merged"]
    assert raw["suffix"] == "my-model"
    for field in ("progress", "trainable_params", "total_params", "estimate", "estimated_finish"):
        assert field in raw

    fetched = project.openai.fine_tuning.jobs.retrieve(job.id)
    assert fetched.model_dump() == job.model_dump()


def test_create_dpo_job_and_random_seed(project: ProjectCtx, dpo_jsonl: str) -> None:
    file_id = project.upload(dpo_jsonl)
    job = project.openai.fine_tuning.jobs.create(
        model=MODEL,
        training_file=file_id,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}},
    )
    assert job.method is not None and job.method.type == "dpo"
    assert job.method.dpo is not None and job.method.dpo.hyperparameters is not None
    assert job.method.dpo.hyperparameters.beta == 0.2
    assert isinstance(job.seed, int)


def test_legacy_hyperparameters_mean_supervised(project: ProjectCtx, chat_jsonl: str) -> None:
    file_id = project.upload(chat_jsonl)
    job = project.openai.fine_tuning.jobs.create(
        model=MODEL, training_file=file_id, hyperparameters={"n_epochs": 2}
    )
    assert job.hyperparameters.n_epochs == 2


def test_events_and_empty_checkpoints(project: ProjectCtx, chat_jsonl: str) -> None:
    job = project.openai.fine_tuning.jobs.create(model=MODEL, training_file=project.upload(chat_jsonl))
    events = list(project.openai.fine_tuning.jobs.list_events(job.id))
    assert [e.object for e in events] == ["fine_tuning.job.event"] * 2
    assert all(e.id.startswith("ftevent-") for e in events)
    messages = [e.message for e in events][::-1]  # newest first on the wire
    assert messages[0].startswith("Created fine-tuning job")
    assert messages[1].startswith("Validating training file")  # a worker adds "validated", "queued"
    page = project.openai.fine_tuning.jobs.list_events(job.id, limit=1)
    assert len(page.data) == 1 and page.has_more
    rest = project.openai.fine_tuning.jobs.list_events(job.id, after=page.data[0].id, limit=5)
    assert [e.id for e in rest.data] == [e.id for e in events[1:]]

    checkpoints = project.openai.fine_tuning.jobs.checkpoints.list(job.id)
    assert checkpoints.data == [] and checkpoints.has_more is False
    raw = project.client.get(f"/v1/fine_tuning/jobs/{job.id}/checkpoints", headers=project.headers).json()
    assert raw == {"object": "list", "data": [], "has_more": False, "first_id": None, "last_id": None}


def test_checkpoints_newest_first_with_first_and_last_id(
    project: ProjectCtx, app: FastAPI, chat_jsonl: str
) -> None:
    job = project.openai.fine_tuning.jobs.create(model=MODEL, training_file=project.upload(chat_jsonl))
    with session_scope(app.state.sessionmaker) as session:
        made = [
            add_checkpoint(session, job.id, step_number=step, storage_key=f"x/{step}", metrics={"step": step})
            for step in (10, 20, 30)
        ]
        ids = [c.id for c in made]
    page = project.openai.fine_tuning.jobs.checkpoints.list(job.id, limit=2)
    assert [c.id for c in page.data] == [ids[2], ids[1]]
    assert page.has_more
    assert page.data[0].step_number == 30 and page.data[0].fine_tuning_job_id == job.id
    assert page.data[0].object == "fine_tuning.job.checkpoint"
    assert page.data[0].metrics.step == 30
    raw = project.client.get(
        f"/v1/fine_tuning/jobs/{job.id}/checkpoints", params={"limit": 2}, headers=project.headers
    ).json()
    assert raw["first_id"] == ids[2] and raw["last_id"] == ids[1]
    assert [c.id for c in project.openai.fine_tuning.jobs.checkpoints.list(job.id)] == ids[::-1]


def test_list_paging_and_metadata_filter(project: ProjectCtx, chat_jsonl: str) -> None:
    file_id = project.upload(chat_jsonl)
    created = [
        project.openai.fine_tuning.jobs.create(
            model=MODEL, training_file=file_id, metadata={"batch": "a" if i % 2 else "b", "n": str(i)}
        ).id
        for i in range(5)
    ]
    newest_first = created[::-1]
    first = project.openai.fine_tuning.jobs.list(limit=2)
    assert [j.id for j in first.data] == newest_first[:2] and first.has_more
    second = project.openai.fine_tuning.jobs.list(limit=2, after=first.data[-1].id)
    assert [j.id for j in second.data] == newest_first[2:4]
    assert [j.id for j in project.openai.fine_tuning.jobs.list(limit=2)] == newest_first  # auto-paging
    last = project.openai.fine_tuning.jobs.list(limit=10, after=newest_first[3])
    assert [j.id for j in last.data] == newest_first[4:] and not last.has_more

    filtered = project.openai.fine_tuning.jobs.list(metadata={"batch": "a"})
    assert [j.id for j in filtered.data] == [created[3], created[1]]
    both = project.openai.fine_tuning.jobs.list(metadata={"batch": "b", "n": "2"})
    assert [j.id for j in both.data] == [created[2]]
    assert project.openai.fine_tuning.jobs.list(metadata={"batch": "zzz"}).data == []


@pytest.mark.parametrize("validated", [False, True], ids=["validating_files", "queued"])
def test_cancel_waiting_job_at_once(
    project: ProjectCtx, app: FastAPI, chat_jsonl: str, validated: bool
) -> None:
    job = project.openai.fine_tuning.jobs.create(model=MODEL, training_file=project.upload(chat_jsonl))
    if validated:
        mark_validated(app, job.id)
    cancelled = project.openai.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    assert cancelled.finished_at is not None
    assert project.openai.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    events = project.openai.fine_tuning.jobs.list_events(job.id).data
    assert events[0].message == "Job cancelled."
    with pytest.raises(openai.BadRequestError) as refused:
        project.openai.fine_tuning.jobs.cancel(job.id)
    assert "already cancelled" in refused.value.message
    with pytest.raises(openai.BadRequestError):
        project.openai.fine_tuning.jobs.pause(job.id)
    with pytest.raises(openai.BadRequestError):
        project.openai.fine_tuning.jobs.resume(job.id)


def test_pause_and_resume_queued_job(project: ProjectCtx, app: FastAPI, chat_jsonl: str) -> None:
    job = project.openai.fine_tuning.jobs.create(model=MODEL, training_file=project.upload(chat_jsonl))
    with pytest.raises(openai.BadRequestError, match="still being validated"):
        project.openai.fine_tuning.jobs.pause(job.id)
    mark_validated(app, job.id)
    paused = project.openai.fine_tuning.jobs.pause(job.id)
    assert paused.status == "paused"
    with pytest.raises(openai.BadRequestError, match="already paused"):
        project.openai.fine_tuning.jobs.pause(job.id)
    resumed = project.openai.fine_tuning.jobs.resume(job.id)
    assert resumed.status == "queued"
    with pytest.raises(openai.BadRequestError, match="only a paused job"):
        project.openai.fine_tuning.jobs.resume(job.id)
    messages = [e.message for e in project.openai.fine_tuning.jobs.list_events(job.id).data]
    assert messages[:2] == ["Job resumed.", "Job paused."]
    paused_again = project.openai.fine_tuning.jobs.pause(job.id)
    assert project.openai.fine_tuning.jobs.cancel(paused_again.id).status == "cancelled"


def test_running_job_records_cancel_and_pause_requests(
    project: ProjectCtx, app: FastAPI, chat_jsonl: str
) -> None:
    job = project.openai.fine_tuning.jobs.create(model=MODEL, training_file=project.upload(chat_jsonl))
    _set(app, job.id, status="running")
    paused = project.openai.fine_tuning.jobs.pause(job.id)
    assert paused.status == "running"
    cancelled = project.openai.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "running"
    assert project.openai.fine_tuning.jobs.cancel(job.id).status == "running"  # idempotent
    with session_scope(app.state.sessionmaker) as session:
        row = session.get(jobs.Job, job.id)
        assert row is not None
        assert row.cancel_requested_at is not None and row.pause_requested_at is not None
    messages = [e.message for e in project.openai.fine_tuning.jobs.list_events(job.id).data]
    assert messages[0].startswith("Cancellation requested")
    assert messages[1].startswith("Pause requested")
    assert len(messages) == 4  # created, validating, and the two requests


@pytest.mark.parametrize("status", ["succeeded", "failed", "cancelled"])
def test_finished_jobs_never_change(project: ProjectCtx, app: FastAPI, chat_jsonl: str, status: str) -> None:
    job = project.openai.fine_tuning.jobs.create(model=MODEL, training_file=project.upload(chat_jsonl))
    _set(app, job.id, status=status)
    for action in ("cancel", "pause", "resume"):
        response = project.client.post(f"/v1/fine_tuning/jobs/{job.id}/{action}", headers=project.headers)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["code"] == "invalid_job_state"
        assert job.id in error["message"]
    with session_scope(app.state.sessionmaker) as session:
        for target in jobs.JobStatus:
            assert not jobs.transition(session, job.id, target, sources=list(jobs.JobStatus))
    assert project.openai.fine_tuning.jobs.retrieve(job.id).status == status


def test_status_machine() -> None:
    S = jobs.JobStatus
    assert jobs.can_transition(S.QUEUED, S.RUNNING)
    assert jobs.can_transition(S.RUNNING, S.SUCCEEDED)
    assert jobs.can_transition(S.PAUSED, S.QUEUED)
    assert not jobs.can_transition(S.QUEUED, S.SUCCEEDED)
    assert not jobs.can_transition(S.PAUSED, S.RUNNING)
    for terminal in (S.SUCCEEDED, S.FAILED, S.CANCELLED):
        assert terminal.is_terminal
        assert not any(jobs.can_transition(terminal, target) for target in S)


def test_concurrent_changes_cannot_both_win(project: ProjectCtx, app: FastAPI, chat_jsonl: str) -> None:
    job = project.openai.fine_tuning.jobs.create(model=MODEL, training_file=project.upload(chat_jsonl))
    factory = app.state.sessionmaker
    with session_scope(factory) as first, session_scope(factory) as second:
        assert first.get(jobs.Job, job.id) is not None and second.get(jobs.Job, job.id) is not None
        assert jobs.transition(first, job.id, jobs.JobStatus.CANCELLED)
        first.commit()
        assert not jobs.transition(second, job.id, jobs.JobStatus.RUNNING)


def test_jobs_are_scoped_to_the_project(
    project: ProjectCtx, other_project: ProjectCtx, chat_jsonl: str
) -> None:
    job = project.openai.fine_tuning.jobs.create(model=MODEL, training_file=project.upload(chat_jsonl))
    assert other_project.openai.fine_tuning.jobs.list().data == []
    for call in (
        lambda: other_project.openai.fine_tuning.jobs.retrieve(job.id),
        lambda: other_project.openai.fine_tuning.jobs.cancel(job.id),
        lambda: other_project.openai.fine_tuning.jobs.pause(job.id),
        lambda: other_project.openai.fine_tuning.jobs.resume(job.id),
        lambda: other_project.openai.fine_tuning.jobs.list_events(job.id),
        lambda: other_project.openai.fine_tuning.jobs.checkpoints.list(job.id),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert project.openai.fine_tuning.jobs.retrieve(job.id).status == "validating_files"


def test_artifacts_list_and_download(project: ProjectCtx, app: FastAPI, chat_jsonl: str) -> None:
    from tuneforge.models.checkpoint import put_artifact

    job = project.openai.fine_tuning.jobs.create(model=MODEL, training_file=project.upload(chat_jsonl))
    empty = project.client.get(f"/v1/fine_tuning/jobs/{job.id}/artifacts", headers=project.headers).json()
    assert empty == {"object": "list", "data": [], "has_more": False}
    payload = b"\x1f\x8b fake tarball bytes"
    key = f"jobs/{job.id}/adapter.tar.gz"
    app.state.store.put_bytes(key, payload)
    with session_scope(app.state.sessionmaker) as session:
        put_artifact(
            session,
            job.id,
            name="adapter",
            storage_key=key,
            size=len(payload),
            sha256="0" * 64,
            content_type="application/gzip",
        )
    listed = project.client.get(f"/v1/fine_tuning/jobs/{job.id}/artifacts", headers=project.headers).json()
    assert [(a["name"], a["bytes"]) for a in listed["data"]] == [("adapter", len(payload))]
    got = project.client.get(f"/v1/fine_tuning/jobs/{job.id}/artifacts/adapter", headers=project.headers)
    assert got.status_code == 200 and got.content == payload
    missing = project.client.get(f"/v1/fine_tuning/jobs/{job.id}/artifacts/merged", headers=project.headers)
    assert missing.status_code == 404
