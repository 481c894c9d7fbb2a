"""Typed dependencies: a route's parameters say what it needs and get it loaded and checked.

`SessionDep` commits before the response is sent (scope="function"); `ProjectDep` is the
authenticated caller; `FileDep`/`JobDep` load an object of the caller's project or answer 404.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Request
from sqlalchemy.orm import Session

from tuneforge.api.auth import Caller, authenticate, bearer_token
from tuneforge.api.errors import Forbidden, NotFound
from tuneforge.api.ratelimit import RateLimiter
from tuneforge.config import Settings
from tuneforge.db import get_session
from tuneforge.models import file as files
from tuneforge.models import job as jobs
from tuneforge.storage import ObjectStore

SessionDep = Annotated[Session, Depends(get_session, scope="function")]


async def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_store(request: Request) -> ObjectStore:
    store: ObjectStore = request.app.state.store
    return store


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
JobId = Annotated[str, Path(description="A fine-tuning job id (ftjob-...).")]
StoreDep = Annotated[ObjectStore, Depends(get_store)]


async def get_caller(request: Request) -> Caller:
    """The admin key and recently checked project keys answer at once; another key is looked up
    by hash through the app's `Reader` (on the event loop on PostgreSQL)."""
    state = request.app.state
    authorization = request.headers.get("authorization")
    caller = await authenticate(state.reader, state.admin_key, authorization, state.key_cache)
    limiter: RateLimiter | None = getattr(state, "rate_limiter", None)
    if limiter is not None and authorization and not caller.is_admin:
        limiter.check(bearer_token(authorization))  # the key itself, however the header spells it
    return caller


ProjectDep = Annotated[Caller, Depends(get_caller)]


async def get_admin(caller: ProjectDep) -> Caller:
    if not caller.is_admin:
        raise Forbidden("Only the admin key may call the admin endpoints.", code="admin_key_required")
    return caller


AdminDep = Annotated[Caller, Depends(get_admin)]


def load_file(
    file_id: Annotated[str, Path(description="A file id (file-...).")],
    caller: ProjectDep,
    session: SessionDep,
) -> files.File:
    row = files.get_file(session, caller.project_id, file_id)
    if row is None:
        raise NotFound(f"No such File object: {file_id}", param="file_id")
    return row


def load_job(
    fine_tuning_job_id: JobId,
    caller: ProjectDep,
    session: SessionDep,
) -> jobs.Job:
    job = jobs.get_job(session, caller.project_id, fine_tuning_job_id)
    if job is None:
        raise NotFound(f"No such fine-tuning job: {fine_tuning_job_id}", param="fine_tuning_job_id")
    return job


FileDep = Annotated[files.File, Depends(load_file)]
JobDep = Annotated[jobs.Job, Depends(load_job)]
