"""The JSON objects the API answers with, in OpenAI's shapes (plus Tuneforge's extensions).

Plain functions from rows to dicts: cheap, and exactly the fields OpenAI's SDK reads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

from pydantic import BaseModel, Field

from tuneforge.models.checkpoint import Artifact, Checkpoint
from tuneforge.models.file import File
from tuneforge.models.job import Job, JobEvent, JobStatus, JobView
from tuneforge.models.project import ApiKey, Project

T = TypeVar("T")


def unix(moment: datetime | None) -> int | None:
    return int(moment.timestamp()) if moment is not None else None


def list_page(
    rows: Sequence[T], limit: int, shape: Callable[[T], dict[str, Any]], *, ids: bool = True
) -> dict[str, Any]:
    """OpenAI's list wrapper from `limit + 1` fetched rows: the extra row only says `has_more`."""
    data = [shape(row) for row in rows[:limit]]
    page: dict[str, Any] = {"object": "list", "data": data, "has_more": len(rows) > limit}
    if ids:
        page["first_id"] = data[0]["id"] if data else None
        page["last_id"] = data[-1]["id"] if data else None
    return page


def file_object(row: File) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "file",
        "bytes": row.bytes,
        "created_at": unix(row.created_at),
        "expires_at": unix(row.expires_at),
        "filename": row.filename,
        "purpose": row.purpose,
        "status": "processed",
        "status_details": None,
    }


def _method(spec: dict[str, Any]) -> dict[str, Any]:
    method = spec.get("method") or {"type": "supervised"}
    kind = method.get("type", "supervised")
    return {"type": kind, kind: method.get(kind) or {"hyperparameters": {}}}


def _estimated_finish(job: JobView) -> int | None:
    eta = (job.progress or {}).get("eta_seconds")
    if job.status != JobStatus.RUNNING or eta is None:
        return None
    return int(job.updated_at.timestamp() + float(eta))


def job_object(job: JobView) -> dict[str, Any]:
    spec = job.spec
    method = _method(spec)
    return {
        "id": job.id,
        "object": "fine_tuning.job",
        "created_at": unix(job.created_at),
        "finished_at": unix(job.finished_at),
        "estimated_finish": _estimated_finish(job),
        "model": job.model,
        "fine_tuned_model": job.fine_tuned_model,
        "organization_id": job.project_id,
        "status": job.status,
        "error": job.error,
        "hyperparameters": method[method["type"]].get("hyperparameters", {}),
        "method": method,
        "training_file": job.training_file,
        "validation_file": job.validation_file,
        "result_files": job.result_files or [],
        "trained_tokens": job.trained_tokens,
        "seed": job.seed,
        "suffix": job.suffix,
        "integrations": spec.get("integrations") or [],
        "metadata": job.metadata_,
        "adapter": spec.get("adapter"),
        "export": spec.get("export") or [],
        "hardware": spec.get("hardware"),
        "progress": job.progress,
        "trainable_params": job.trainable_params,
        "total_params": job.total_params,
        "estimate": job.estimate,
        "base_model": job.base_model or job.model,
        "parent": {"job": job.parent_job_id, "checkpoint": job.parent_checkpoint_id}
        if job.parent_job_id
        else None,
    }


def event_object(event: JobEvent) -> dict[str, Any]:
    return {
        "id": event.id,
        "object": "fine_tuning.job.event",
        "created_at": unix(event.created_at),
        "level": event.level,
        "message": event.message,
        "type": event.type,
        "data": event.data,
    }


def checkpoint_object(checkpoint: Checkpoint, job: Job) -> dict[str, Any]:
    # Before the job succeeds its model has no name yet; a continued job's `model` is an `ft:` name,
    # so the provisional one is built on the original base (never `ft:ft:...`).
    model = job.fine_tuned_model or f"ft:{job.base_model or job.model}:{job.project_id}"
    return {
        "id": checkpoint.id,
        "object": "fine_tuning.job.checkpoint",
        "created_at": unix(checkpoint.created_at),
        "fine_tuned_model_checkpoint": f"{model}:ckpt-step-{checkpoint.step_number}",
        "fine_tuning_job_id": checkpoint.job_id,
        "step_number": checkpoint.step_number,
        "metrics": checkpoint.metrics or {},
    }


def artifact_object(artifact: Artifact) -> dict[str, Any]:
    return {
        "name": artifact.name,
        "bytes": artifact.bytes,
        "sha256": artifact.sha256,
        "content_type": artifact.content_type,
        "created_at": unix(artifact.created_at),
    }


def model_object(model_id: str, created: int, owned_by: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by}


def project_object(project: Project) -> dict[str, Any]:
    return {
        "id": project.id,
        "object": "organization.project",
        "name": project.name,
        "created_at": unix(project.created_at),
    }


def api_key_object(key: ApiKey, plaintext: str | None = None) -> dict[str, Any]:
    body = {
        "id": key.id,
        "object": "organization.project.api_key",
        "project_id": key.project_id,
        "redacted_value": key.prefix + "...",
        "created_at": unix(key.created_at),
        "revoked_at": unix(key.revoked_at),
    }
    if plaintext is not None:
        body["value"] = plaintext
    return body


class ProjectCreate(BaseModel):
    name: str = Field(..., min_length=1, max_length=256, description="A name for people.")
