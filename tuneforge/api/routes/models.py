"""/v1/models: base models on offer, then the caller's fine-tuned models; a fine-tuned model's
checkpoints (`ft:...:ckpt-step-N`) answer too, and a fine-tuned model can be deleted."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from tuneforge.api.deps import ProjectDep, SessionDep, SettingsDep, StoreDep
from tuneforge.api.errors import BadRequest, NotFound
from tuneforge.api.responses import NOT_FOUND, Deleted, Model, ModelList, ok
from tuneforge.api.schemas import model_object, unix
from tuneforge.db import after_commit
from tuneforge.models import job as jobs
from tuneforge.models import lineage
from tuneforge.storage.keys import job_prefix
from tuneforge.training.base_models import list_base_models

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/models", tags=["models"])

BASE_OWNER = "tuneforge"


def _all_models(caller: ProjectDep, session: SessionDep, settings: SettingsDep) -> list[dict[str, Any]]:
    found = [
        model_object(entry.id, entry.created, BASE_OWNER)
        for entry in list_base_models(settings.models, settings.models_dir)
    ]
    found += [
        model_object(name, unix(created) or 0, caller.project_id)
        for name, created in jobs.list_fine_tuned_models(session, caller.project_id)
    ]
    return found


@router.get(
    "", summary="List models: base models on offer, then your fine-tuned ones", responses=ok(ModelList)
)
def list_models(caller: ProjectDep, session: SessionDep, settings: SettingsDep) -> JSONResponse:
    return JSONResponse({"object": "list", "data": _all_models(caller, session, settings)})


@router.get("/{model_id:path}", summary="Retrieve a model", responses={**ok(Model), **NOT_FOUND})
def retrieve_model(
    model_id: str, caller: ProjectDep, session: SessionDep, settings: SettingsDep
) -> JSONResponse:
    for entry in list_base_models(settings.models, settings.models_dir):
        if entry.id == model_id:
            return JSONResponse(model_object(entry.id, entry.created, BASE_OWNER))
    source = lineage.find_source(session, caller.project_id, model_id)
    if source is None:
        raise NotFound(f"The model '{model_id}' does not exist.", param="model")
    made = source.checkpoint.created_at if source.checkpoint else source.job.finished_at
    return JSONResponse(model_object(model_id, unix(made or source.job.created_at) or 0, caller.project_id))


@router.delete(
    "/{model_id:path}",
    summary="Delete a fine-tuned model: its artifacts and checkpoints leave the store",
    responses={**ok(Deleted), **NOT_FOUND},
)
def delete_model(model_id: str, caller: ProjectDep, session: SessionDep, store: StoreDep) -> JSONResponse:
    """The job stays (its events and metrics too); its model, artifacts and checkpoints go, and
    neither it nor its checkpoints can be continued from or downloaded any more."""
    source = lineage.find_source(session, caller.project_id, model_id)
    if source is None:
        raise NotFound(f"The model '{model_id}' does not exist.", param="model")
    if source.checkpoint is not None:
        raise BadRequest(
            f"'{model_id}' is a checkpoint; checkpoints are deleted with their fine-tuned model "
            f"({source.job.fine_tuned_model}).",
            param="model",
            code="invalid_model",
        )
    lineage.delete_fine_tuned_model(session, source.job)
    prefix = job_prefix(source.job.id)

    def delete_objects() -> None:
        try:
            store.delete_prefix(prefix)
        except Exception:  # the rows are gone; what is left is unreachable, and logged
            log.exception("could not delete the objects under %s of a deleted model", prefix)

    after_commit(session, delete_objects)
    return JSONResponse({"id": model_id, "object": "model", "deleted": True})
