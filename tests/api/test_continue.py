"""Creating a job from a fine-tuned model or checkpoint, and deleting a fine-tuned model, at the API
(no worker: the parent job's success is written the way a worker writes it). The training side is
tests/e2e/test_iterate.py."""

from __future__ import annotations

from typing import Any

import openai
import pytest
from fastapi import FastAPI

from tests.api.conftest import ProjectCtx
from tuneforge.db import session_scope
from tuneforge.models.checkpoint import add_checkpoint, put_artifact
from tuneforge.models.job import Job
from tuneforge.storage.keys import CheckpointKeys, artifact_key


def _succeeded_parent(project: ProjectCtx, app: FastAPI, training_file: str) -> tuple[Job, str, str]:
    """A succeeded LoRA job with a checkpoint at step 10: (job, its model name, checkpoint name)."""
    created = project.openai.fine_tuning.jobs.create(
        model="tuneforge/tiny-chat",
        training_file=training_file,
        extra_body={"adapter": {"type": "lora", "r": 8}},
    )
    name = f"ft:tuneforge/tiny-chat:{project.id}::{created.id[-8:]}"
    with session_scope(app.state.sessionmaker) as session:
        job = session.get(Job, created.id)
        assert job is not None
        job.status, job.fine_tuned_model = "succeeded", name
        checkpoint = add_checkpoint(
            session, job.id, step_number=10, storage_key=CheckpointKeys(job.id, "ftckpt-x").adapter
        )
        put_artifact(
            session,
            job.id,
            name="adapter",
            storage_key=artifact_key(job.id, "adapter"),
            size=1,
            sha256="0" * 64,
            content_type="application/gzip",
        )
        session.expunge(job)
        checkpoint_id = checkpoint.id
    return job, name, checkpoint_id


def _refused(project: ProjectCtx, model: str, training_file: str, **extra: Any) -> dict[str, Any]:
    with pytest.raises(openai.BadRequestError) as caught:
        project.openai.fine_tuning.jobs.create(
            model=model, training_file=training_file, extra_body=extra or None
        )
    assert isinstance(caught.value.body, dict)
    return caught.value.body


def test_continue_records_lineage_and_bad_sources_are_400(
    project: ProjectCtx, other_project: ProjectCtx, app: FastAPI, chat_jsonl: str
) -> None:
    training_file = project.upload(chat_jsonl)
    parent, name, checkpoint_id = _succeeded_parent(project, app, training_file)

    child = project.openai.fine_tuning.jobs.create(model=name, training_file=training_file).to_dict()
    assert child["model"] == name and child["base_model"] == "tuneforge/tiny-chat"
    assert child["parent"] == {"job": parent.id, "checkpoint": None}
    assert child["adapter"]["r"] == 8  # the parent's adapter carries over
    events = project.openai.fine_tuning.jobs.list_events(child["id"]).data
    assert any(e.message.startswith(f"Continuing from {name}: job {parent.id}") for e in events)

    ckpt = f"{name}:ckpt-step-10"
    assert project.openai.models.retrieve(ckpt).id == ckpt
    resumed = project.openai.fine_tuning.jobs.create(
        model=ckpt, training_file=training_file, extra_body={"continue": {"optimizer_state": True}}
    ).to_dict()
    assert resumed["parent"] == {"job": parent.id, "checkpoint": checkpoint_id}
    plain = project.openai.fine_tuning.jobs.create(model="tuneforge/tiny-chat", training_file=training_file)
    assert plain.to_dict()["base_model"] == "tuneforge/tiny-chat" and plain.to_dict()["parent"] is None

    unknown = _refused(project, "ft:tuneforge/tiny-chat:nobody::deadbeef", training_file)
    assert unknown["param"] == "model"
    assert _refused(project, f"{name}:ckpt-step-11", training_file)["param"] == "model"
    assert _refused(project, child["id"], training_file)["param"] == "model"
    assert _refused(project, name, training_file, adapter={"type": "ia3"})["param"] == "adapter.type"
    assert _refused(project, name, training_file, adapter={"type": "full"})["param"] == "adapter.type"
    # A reward model's adapter has a classification head: no job continues into or from one.
    reward = _refused(project, name, training_file, method={"type": "reward_model"})
    assert reward["param"] == "model" and "reward_model" in reward["message"]
    continued = {"continue": {"optimizer_state": True}}
    assert _refused(project, "tuneforge/tiny-chat", training_file, **continued)["param"] == "continue"
    assert _refused(project, name, training_file, **continued)["param"] == "continue.optimizer_state"
    # Another project: the very answer an unknown name gets, no hint that the model exists.
    foreign = _refused(other_project, name, other_project.upload(chat_jsonl))
    assert foreign["message"] == unknown["message"].replace("ft:tuneforge/tiny-chat:nobody::deadbeef", name)
    with pytest.raises(openai.NotFoundError):
        other_project.openai.models.retrieve(ckpt)


def test_deleting_a_fine_tuned_model(
    project: ProjectCtx, other_project: ProjectCtx, app: FastAPI, chat_jsonl: str
) -> None:
    training_file = project.upload(chat_jsonl)
    parent, name, _ = _succeeded_parent(project, app, training_file)
    with pytest.raises(openai.NotFoundError):
        other_project.openai.models.delete(name)
    with pytest.raises(openai.BadRequestError):
        project.openai.models.delete(f"{name}:ckpt-step-10")  # checkpoints go with their model

    deleted = project.openai.models.delete(name)
    assert (deleted.id, deleted.object, deleted.deleted) == (name, "model", True)
    assert name not in [m.id for m in project.openai.models.list().data]
    for gone in (name, f"{name}:ckpt-step-10"):
        with pytest.raises(openai.NotFoundError):
            project.openai.models.retrieve(gone)
        assert _refused(project, gone, training_file)["param"] == "model"
    assert project.openai.fine_tuning.jobs.checkpoints.list(parent.id).data == []
    assert project.openai.fine_tuning.jobs.retrieve(parent.id).status == "succeeded"  # the job stays
    with pytest.raises(openai.NotFoundError):
        project.openai.models.delete(name)
