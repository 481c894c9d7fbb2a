"""/v1/models: base models on offer, then the caller's fine-tuned models."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from tuneforge.api.deps import ProjectDep, SessionDep, SettingsDep
from tuneforge.api.errors import NotFound
from tuneforge.api.responses import NOT_FOUND, Model, ModelList, ok
from tuneforge.api.schemas import model_object, unix
from tuneforge.models import job as jobs
from tuneforge.training.base_models import list_base_models

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
    job = jobs.find_fine_tuned_model(session, caller.project_id, model_id)
    if job is None:
        raise NotFound(f"The model '{model_id}' does not exist.", param="model")
    return JSONResponse(
        model_object(model_id, unix(job.finished_at or job.created_at) or 0, caller.project_id)
    )
