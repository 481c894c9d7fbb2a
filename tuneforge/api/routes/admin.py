"""/v1/admin: projects and their API keys (admin key only)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from tuneforge.api.auth import KeyCache
from tuneforge.api.deps import AdminDep, SessionDep
from tuneforge.api.errors import NotFound
from tuneforge.api.responses import NOT_FOUND, ApiKey, ApiKeyDeleted, ApiKeyList, Project, ProjectList, ok
from tuneforge.api.schemas import ProjectCreate, api_key_object, project_object
from tuneforge.db import after_commit
from tuneforge.models import project as projects

router = APIRouter(prefix="/v1/admin/projects", tags=["admin"])


def _project(session: SessionDep, project_id: str) -> projects.Project:
    project = projects.get_project(session, project_id)
    if project is None:
        raise NotFound(f"No such project: {project_id}", param="project_id")
    return project


@router.post("", summary="Create a project", responses=ok(Project))
def create_project(body: ProjectCreate, admin: AdminDep, session: SessionDep) -> JSONResponse:
    return JSONResponse(project_object(projects.create_project(session, body.name)))


@router.get("", summary="List projects", responses=ok(ProjectList))
def list_projects(admin: AdminDep, session: SessionDep) -> JSONResponse:
    rows = projects.list_projects(session)
    return JSONResponse({"object": "list", "data": [project_object(p) for p in rows], "has_more": False})


@router.get("/{project_id}", summary="Retrieve a project", responses={**ok(Project), **NOT_FOUND})
def retrieve_project(project_id: str, admin: AdminDep, session: SessionDep) -> JSONResponse:
    return JSONResponse(project_object(_project(session, project_id)))


@router.post(
    "/{project_id}/api_keys",
    summary="Create an API key (its value is shown only here)",
    responses={**ok(ApiKey), **NOT_FOUND},
)
def create_api_key(project_id: str, admin: AdminDep, session: SessionDep) -> JSONResponse:
    _project(session, project_id)
    key, plaintext = projects.create_api_key(session, project_id)
    return JSONResponse(api_key_object(key, plaintext))


@router.get(
    "/{project_id}/api_keys",
    summary="List a project's API keys (never their values)",
    responses={**ok(ApiKeyList), **NOT_FOUND},
)
def list_api_keys(project_id: str, admin: AdminDep, session: SessionDep) -> JSONResponse:
    _project(session, project_id)
    rows = projects.list_api_keys(session, project_id)
    return JSONResponse({"object": "list", "data": [api_key_object(k) for k in rows], "has_more": False})


@router.delete(
    "/{project_id}/api_keys/{key_id}",
    summary="Revoke an API key",
    responses={**ok(ApiKeyDeleted), **NOT_FOUND},
)
def revoke_api_key(
    request: Request, project_id: str, key_id: str, admin: AdminDep, session: SessionDep
) -> JSONResponse:
    """The key stops working at once on this API process, and within
    TUNEFORGE_API_KEY_CACHE_SECONDS on the others."""
    _project(session, project_id)
    key = projects.revoke_api_key(session, project_id, key_id)
    if key is None:
        raise NotFound(f"No such API key in project {project_id}: {key_id}", param="key_id")
    cache: KeyCache = request.app.state.key_cache
    key_hash = key.key_hash
    cache.forget(key_hash)
    after_commit(session, lambda: cache.forget(key_hash))
    return JSONResponse({**api_key_object(key), "deleted": True})
