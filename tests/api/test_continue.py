"""Creating a job from a fine-tuned model or checkpoint, and deleting a fine-tuned model, at the API
(no worker: the parent job's success is written the way a worker writes it). The training side is
tests/e2e/test_iterate.py."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi import FastAPI

from tests.api.conftest import ProjectCtx
from tuneforge.db import session_scope
from tuneforge.models import lineage
from tuneforge.models.checkpoint import add_checkpoint, put_artifact
from tuneforge.models.job import Job
from tuneforge.storage.keys import CheckpointKeys, artifact_key


def _succeeded_parent(
    project: ProjectCtx, app: FastAPI, training_file: str, adapter: dict[str, Any] | None = None
) -> tuple[Job, str, str]:
    """A succeeded job (LoRA r 8 unless `adapter` says) with a checkpoint at step 10: (job, its
    model name, checkpoint id)."""
    created = project.openai.fine_tuning.jobs.create(
        model="tuneforge/tiny-chat",
        training_file=training_file,
        extra_body={"adapter": adapter or {"type": "lora", "r": 8}},
    )
    return _succeed(project, app, created.id)


def _succeed(project: ProjectCtx, app: FastAPI, job_id: str) -> tuple[Job, str, str]:
    """Writes the job's success as a worker does: its model name, a checkpoint at step 10 and its
    final artifact."""
    name = f"ft:tuneforge/tiny-chat:{project.id}::{job_id[-8:]}"
    with session_scope(app.state.sessionmaker) as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.status, job.fine_tuned_model = "succeeded", name
        full = job.spec["adapter"]["type"] == "full"
        checkpoint = add_checkpoint(
            session, job.id, step_number=10, storage_key=CheckpointKeys(job.id, "ftckpt-x").adapter
        )
        put_artifact(
            session,
            job.id,
            name="model" if full else "adapter",
            storage_key=artifact_key(job.id, "model" if full else "adapter"),
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


def test_a_full_source_continues_with_full_fine_tuning_only(
    project: ProjectCtx, app: FastAPI, chat_jsonl: str
) -> None:
    training_file = project.upload(chat_jsonl)
    parent, name, checkpoint_id = _succeeded_parent(project, app, training_file, adapter={"type": "full"})

    for model, checkpoint, extra in (
        (name, None, None),  # the adapter left out: the source's, full
        (f"{name}:ckpt-step-10", checkpoint_id, {"adapter": {"type": "full"}}),
    ):
        child = project.openai.fine_tuning.jobs.create(
            model=model, training_file=training_file, extra_body=extra
        ).to_dict()
        assert child["status"] == "validating_files" and child["adapter"]["type"] == "full"
        assert (child["model"], child["base_model"]) == (model, "tuneforge/tiny-chat")
        assert child["parent"] == {"job": parent.id, "checkpoint": checkpoint}
        events = project.openai.fine_tuning.jobs.list_events(child["id"]).data
        event = next(e for e in events if e.message.startswith(f"Continuing from {model}"))
        assert event.to_dict()["data"]["parent"] == child["parent"]
        if checkpoint is None:  # the worker starts from the parent's full weights
            with session_scope(app.state.sessionmaker) as session:
                job = session.get(Job, child["id"])
                assert job is not None
                assert lineage.source_object(session, job) == lineage.SourceObject(
                    artifact_key(parent.id, "model"), True, False
                )

    for adapter in ("lora", "dora", "ia3"):
        refused = _refused(project, name, training_file, adapter={"type": adapter})
        assert refused["param"] == "adapter.type" and "'full'" in refused["message"], refused


def test_a_merged_peft_source_continues_with_full_fine_tuning(
    project: ProjectCtx, app: FastAPI, chat_jsonl: str
) -> None:
    """The one change of adapter type: a LoRA job that exported merged weights is full weights,
    and the worker downloads that export for a full child (a LoRA child still trains the adapter)."""
    training_file = project.upload(chat_jsonl)
    parent, name, _ = _succeeded_parent(project, app, training_file)
    unmerged = _refused(project, name, training_file, adapter={"type": "full"})
    assert unmerged["param"] == "adapter.type" and '"export": ["merged"]' in unmerged["message"]
    with session_scope(app.state.sessionmaker) as session:
        put_artifact(
            session,
            parent.id,
            name="merged",
            storage_key=artifact_key(parent.id, "merged"),
            size=1,
            sha256="0" * 64,
            content_type="application/gzip",
        )

    full = project.openai.fine_tuning.jobs.create(
        model=name, training_file=training_file, extra_body={"adapter": {"type": "full"}}
    ).to_dict()
    assert full["adapter"]["type"] == "full" and full["parent"] == {"job": parent.id, "checkpoint": None}
    events = project.openai.fine_tuning.jobs.list_events(full["id"]).data
    assert any(
        e.message.startswith(f"Continuing from {name}: job {parent.id}, final weights, merged")
        for e in events
    )
    lora = project.openai.fine_tuning.jobs.create(model=name, training_file=training_file).to_dict()
    with session_scope(app.state.sessionmaker) as session:
        for child, key, weights in ((full, "merged", True), (lora, "adapter", False)):
            job = session.get(Job, child["id"])
            assert job is not None
            assert lineage.source_object(session, job) == lineage.SourceObject(
                artifact_key(parent.id, key), weights, False
            )
    # A checkpoint has no merged weights; another adapter on the merged ones would not load onto the base.
    checkpoint = _refused(project, f"{name}:ckpt-step-10", training_file, adapter={"type": "full"})
    assert checkpoint["param"] == "adapter.type"
    assert _refused(project, name, training_file, adapter={"type": "dora"})["param"] == "adapter.type"


def test_an_unfinished_jobs_checkpoint_is_not_a_source(
    project: ProjectCtx, app: FastAPI, chat_jsonl: str
) -> None:
    """A running or failed job's checkpoints are listed (with the name the job's model would
    have), but only a succeeded job's model and checkpoints can be continued."""
    training_file = project.upload(chat_jsonl)
    for status in ("running", "failed"):
        created = project.openai.fine_tuning.jobs.create(
            model="tuneforge/tiny-chat", training_file=training_file
        )
        with session_scope(app.state.sessionmaker) as session:
            job = session.get(Job, created.id)
            assert job is not None
            job.status = status
            add_checkpoint(
                session, job.id, step_number=10, storage_key=CheckpointKeys(job.id, "ftckpt-y").adapter
            )
        (listed,) = project.openai.fine_tuning.jobs.checkpoints.list(created.id).data
        unknown = _refused(project, listed.fine_tuned_model_checkpoint, training_file)
        assert unknown["param"] == "model", unknown
        assert "succeeded job" in unknown["message"]
        # What the model would be called had it succeeded, and its checkpoint: not sources either.
        would_be = f"ft:tuneforge/tiny-chat:{project.id}::{created.id[-8:]}"
        for name in (would_be, f"{would_be}:ckpt-step-10"):
            assert _refused(project, name, training_file)["param"] == "model"


def test_a_running_continued_jobs_checkpoints_are_named_on_the_original_base(
    project: ProjectCtx, app: FastAPI, chat_jsonl: str
) -> None:
    """Until it succeeds a job's checkpoints carry a provisional name built on its model; for a job
    continued from an `ft:` model that is the original base, not `ft:ft:...`."""
    training_file = project.upload(chat_jsonl)
    _, name, _ = _succeeded_parent(project, app, training_file)
    child = project.openai.fine_tuning.jobs.create(model=name, training_file=training_file)
    with session_scope(app.state.sessionmaker) as session:
        job = session.get(Job, child.id)
        assert job is not None
        job.status = "running"
        add_checkpoint(session, job.id, step_number=4, storage_key=CheckpointKeys(job.id, "ftckpt-z").adapter)
    (listed,) = project.openai.fine_tuning.jobs.checkpoints.list(child.id).data
    assert listed.fine_tuned_model_checkpoint == f"ft:tuneforge/tiny-chat:{project.id}:ckpt-step-4"


def _stored_spec(app: FastAPI, job_id: str) -> dict[str, Any]:
    with session_scope(app.state.sessionmaker) as session:
        job = session.get(Job, job_id)
        assert job is not None
        return dict(job.spec)


README = Path(__file__).resolve().parents[2] / "README.md"


def _walk_through() -> dict[str, str]:
    """The code of README's 'Iterate on a model' walk-through, by step: 'setup', '1', '2', '3'."""
    section = README.read_text().split("### Iterate on a model", 1)[1]
    code = section.split("```python\n", 1)[1].split("\n```", 1)[0]
    setup, *numbered = re.split(r"^# ([0-9])\. .*\n", code, flags=re.MULTILINE)
    steps = {"setup": setup, **dict(zip(numbered[::2], numbered[1::2], strict=True))}
    assert list(steps) == ["setup", "1", "2", "3"], list(steps)
    return steps


def test_the_readme_walk_through_is_accepted(
    project: ProjectCtx, app: FastAPI, chat_jsonl: str, tmp_path: Path
) -> None:
    """README's SFT -> evaluate -> DPO walk-through, its own code run against the API through the
    SDK: every file and job it creates is accepted (no worker trains them; the SFT job's success
    and its per-item results file are written as a worker writes them). Step 2 only reads what
    the worker wrote, so it is not run; its `rows` are given."""
    steps = _walk_through()
    lines = chat_jsonl.splitlines()
    (tmp_path / "qa.jsonl").write_text("\n".join(lines[:24]) + "\n")
    (tmp_path / "qa_valid.jsonl").write_text("\n".join(lines[24:]) + "\n")
    scope: dict[str, Any] = {
        "client": project.openai,
        "json": json,
        "open": lambda path, mode="r": (tmp_path / path).open(mode),
    }
    exec(steps["setup"], scope)
    exec(steps["1"], scope)
    sft = scope["sft"]
    assert sft.status == "validating_files" and _stored_spec(app, sft.id)["evaluation"]["compare_base"]
    _succeed(project, app, sft.id)
    scope["sft"] = project.openai.fine_tuning.jobs.retrieve(sft.id)  # step 1's last line, once it succeeded

    # Step 2's rows: what JobEvaluation.write_results writes, one per validation item.
    valid = [json.loads(line)["messages"] for line in lines[24:]]
    scope["rows"] = [
        {
            "index": i,
            "prompt": messages[:-1],
            "reference": messages[-1]["content"],
            "fine_tuned_answer": messages[-1]["content"] if i % 2 else "I do not know.",
            "fine_tuned_score": float(i % 2),
            "base_answer": "Hello.",
            "base_score": 0.0,
        }
        for i, messages in enumerate(valid)
    ]
    exec(steps["3"], scope)
    dpo = scope["dpo"].to_dict()
    assert dpo["status"] == "validating_files" and dpo["method"]["type"] == "dpo"
    assert (dpo["model"], dpo["base_model"]) == (scope["sft"].fine_tuned_model, "tuneforge/tiny-chat")
    assert dpo["parent"] == {"job": sft.id, "checkpoint": None}
    # Graded as the SFT job was, so the DPO job's base_eval_score is the SFT model's score.
    assert _stored_spec(app, dpo["id"])["evaluation"] == _stored_spec(app, sft.id)["evaluation"]
    assert dpo["validation_file"] == scope["prefs_valid"].id
