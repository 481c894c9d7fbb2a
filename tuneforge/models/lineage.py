"""Lineage of continued jobs: which fine-tuned model or checkpoint a name refers to, what a child job
downloads to start from it, and deleting a fine-tuned model.

A job may start from a fine-tuned model (`ft:...`, a succeeded job's `fine_tuned_model`) or one of
its checkpoints (`ft:...:ckpt-step-N`, what the checkpoint list shows as
`fine_tuned_model_checkpoint`). Both resolve only within the caller's project and only while the
model is not deleted; anything else is unknown, with no hint that it exists elsewhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from tuneforge.db import utcnow
from tuneforge.models.checkpoint import Artifact, Checkpoint, get_artifact
from tuneforge.models.job import Job, JobStatus, find_fine_tuned_model, update_job_where
from tuneforge.storage.keys import CheckpointKeys

_CHECKPOINT_NAME = re.compile(r"(?P<model>ft:.+):ckpt-step-(?P<step>[0-9]{1,10})")


@dataclass(frozen=True)
class Source:
    """What a continued job starts from: a succeeded job, and one of its checkpoints or None (its
    final weights)."""

    job: Job
    checkpoint: Checkpoint | None


def is_fine_tuned_name(name: str) -> bool:
    return name.startswith("ft:")


def find_source(session: Session, project_id: str, name: str) -> Source | None:
    """The project's fine-tuned model or checkpoint called `name`; None when there is none (another
    project's, a deleted one, an unfinished job's or an unknown name)."""
    match = _CHECKPOINT_NAME.fullmatch(name)
    model_name = match["model"] if match else name
    job = find_fine_tuned_model(session, project_id, model_name)
    if job is None or job.status != JobStatus.SUCCEEDED:
        return None
    if match is None:
        return Source(job, None)
    checkpoint = session.scalar(
        select(Checkpoint)
        .where(Checkpoint.job_id == job.id, Checkpoint.step_number == int(match["step"]))
        .order_by(Checkpoint.created_at.desc(), Checkpoint.id.desc())
        .limit(1)
    )
    return Source(job, checkpoint) if checkpoint is not None else None


@dataclass(frozen=True)
class SourceObject:
    """The stored archive a continued job unpacks to start from: a checkpoint's full trainer
    state (adapter or weights, optimizer and scheduler), or a finished job's `adapter`, `model`
    or (for full fine-tuning of a PEFT model) `merged` artifact. `full` when it holds full weights
    rather than a PEFT adapter."""

    storage_key: str
    full: bool
    checkpoint: bool


def trains_merged_weights(parent_spec: dict[str, Any], spec: dict[str, Any]) -> bool:
    """A full fine-tuning job continuing from a PEFT model: it starts from that model's merged
    export (the API lets it only where the parent job has one)."""
    return _adapter_type(spec) == "full" and _adapter_type(parent_spec) != "full"


def _adapter_type(spec: dict[str, Any]) -> str | None:
    return (spec.get("adapter") or {}).get("type")


def has_merged_weights(session: Session, job: Job) -> bool:
    return get_artifact(session, job.id, "merged") is not None


def source_object(session: Session, job: Job) -> SourceObject | None:
    """What the continued `job` downloads; None when its parent model or checkpoint is gone
    (deleted, or the checkpoint pruned) since the job was created."""
    if job.parent_job_id is None:
        return None
    parent = session.get(Job, job.parent_job_id)
    if parent is None or parent.model_deleted_at is not None:
        return None
    if job.parent_checkpoint_id is not None:
        checkpoint = session.get(Checkpoint, job.parent_checkpoint_id)
        if checkpoint is None or checkpoint.job_id != parent.id:
            return None
        full = _adapter_type(parent.spec) == "full"
        return SourceObject(CheckpointKeys.parse(checkpoint.storage_key).state, full, True)
    if _adapter_type(parent.spec) == "full":
        name = "model"
    elif trains_merged_weights(parent.spec, job.spec):
        name = "merged"
    else:
        name = "adapter"
    artifact = get_artifact(session, parent.id, name)
    return SourceObject(artifact.storage_key, name != "adapter", False) if artifact is not None else None


def delete_fine_tuned_model(session: Session, job: Job) -> None:
    """Marks the job's model deleted and drops its artifact and checkpoint rows (the job and its
    events stay). The caller deletes the objects under the job's store prefix after the commit."""
    update_job_where(session, job.id, Job.model_deleted_at.is_(None), model_deleted_at=utcnow())
    session.execute(delete(Artifact).where(Artifact.job_id == job.id))
    session.execute(delete(Checkpoint).where(Checkpoint.job_id == job.id))
