"""/v1/fine_tuning/jobs: create, list, retrieve, cancel, pause, resume; events, checkpoints and
artifacts of a job."""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse

from tuneforge.api.deps import JobDep, JobId, ProjectDep, SessionDep, SettingsDep, StoreDep
from tuneforge.api.errors import BadRequest, NotFound
from tuneforge.api.live_events import JobEventBus, job_event_stream
from tuneforge.api.paging import After, cursor_row
from tuneforge.api.responses import (
    NOT_FOUND,
    ArtifactList,
    FineTuningJob,
    FineTuningJobCheckpointList,
    FineTuningJobEventList,
    FineTuningJobList,
    download,
    ok,
)
from tuneforge.api.schemas import (
    artifact_object,
    checkpoint_object,
    event_object,
    job_object,
    list_page,
)
from tuneforge.api.services import jobs as job_service
from tuneforge.api.services.files import content_disposition
from tuneforge.models import checkpoint as checkpoints
from tuneforge.models import job as jobs
from tuneforge.models.spec import JobSpec
from tuneforge.storage import ObjectNotFound, ObjectStore

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])

_METADATA_PARAM = re.compile(r"^metadata\[(.+)\]$")

Limit20 = Annotated[int, Query(ge=1, le=1000, description="Page size.")]
Limit10 = Annotated[int, Query(ge=1, le=1000, description="Page size.")]
Redirect = Annotated[
    bool, Query(description="On S3, answer 307 to a presigned URL instead of streaming the bytes.")
]


@router.post("", summary="Create a fine-tuning job", responses=ok(FineTuningJob))
def create_job(spec: JobSpec, caller: ProjectDep, session: SessionDep, settings: SettingsDep) -> JSONResponse:
    return JSONResponse(job_object(job_service.create_job(session, settings, caller.project_id, spec)))


@router.get("", summary="List fine-tuning jobs, newest first", responses=ok(FineTuningJobList))
def list_jobs(
    request: Request, caller: ProjectDep, session: SessionDep, after: After = None, limit: Limit20 = 20
) -> JSONResponse:
    """Filter by metadata with `metadata[key]=value` query parameters (all must match)."""
    metadata = {
        m.group(1): value
        for name, value in request.query_params.multi_items()
        if (m := _METADATA_PARAM.match(name))
    }
    cursor = cursor_row(
        after, lambda id_: jobs.get_job(session, caller.project_id, id_), "No such fine-tuning job"
    )
    rows = jobs.list_jobs(session, caller.project_id, limit=limit + 1, after=cursor, metadata=metadata)
    return JSONResponse(list_page(rows, limit, job_object, ids=False))


@router.get(
    "/{fine_tuning_job_id}",
    summary="Retrieve a fine-tuning job",
    responses={**ok(FineTuningJob), **NOT_FOUND},
)
async def retrieve_job(fine_tuning_job_id: JobId, caller: ProjectDep, request: Request) -> JSONResponse:
    """The hot path of polling clients: one read of the shown columns on the event loop (no
    session, no thread hop on PostgreSQL), never cached."""
    job = await jobs.read_job_view(request.app.state.reader, caller.project_id, fine_tuning_job_id)
    if job is None:
        raise NotFound(f"No such fine-tuning job: {fine_tuning_job_id}", param="fine_tuning_job_id")
    return JSONResponse(job_object(job))


@router.post(
    "/{fine_tuning_job_id}/cancel",
    summary="Cancel a job",
    responses={**ok(FineTuningJob), **NOT_FOUND},
)
def cancel_job(job: JobDep, session: SessionDep) -> JSONResponse:
    """A job that has not started stops at once; a running one stops at its next step."""
    return JSONResponse(job_object(job_service.cancel_job(session, job)))


@router.post(
    "/{fine_tuning_job_id}/pause",
    summary="Pause a job",
    responses={**ok(FineTuningJob), **NOT_FOUND},
)
def pause_job(job: JobDep, session: SessionDep) -> JSONResponse:
    """A queued job pauses at once; a running one checkpoints, then pauses."""
    return JSONResponse(job_object(job_service.pause_job(session, job)))


@router.post(
    "/{fine_tuning_job_id}/resume",
    summary="Resume a paused job",
    responses={**ok(FineTuningJob), **NOT_FOUND},
)
def resume_job(job: JobDep, session: SessionDep) -> JSONResponse:
    return JSONResponse(job_object(job_service.resume_job(session, job)))


EVENTS_ANSWER: dict[int | str, dict[str, Any]] = {
    200: {
        "model": FineTuningJobEventList,
        "description": "The events, newest first; with `stream=true`, Server-Sent Events.",
        "content": {
            "text/event-stream": {
                "schema": {
                    "type": "string",
                    "description": "With `stream=true`: `id:` the event id and `data:` the event "
                    "object, oldest first, until the job is final; `: ping` comments as heartbeats.",
                }
            }
        },
    }
}


def _last_seq(session: SessionDep, job: jobs.Job, last_event_id: str | None) -> int:
    """The seq after which a stream starts: 0, or that of the event named by Last-Event-ID."""
    if last_event_id is None or not last_event_id.strip():
        return 0
    event = jobs.get_event(session, job.id, last_event_id.strip())
    if event is None:
        raise BadRequest(f"No such event of job {job.id}: {last_event_id.strip()}", param="Last-Event-ID")
    return event.seq


@router.get(
    "/{fine_tuning_job_id}/events",
    summary="List a job's events, newest first (or stream them live with stream=true)",
    responses={**EVENTS_ANSWER, **NOT_FOUND},
)
def list_events(
    request: Request,
    job: JobDep,
    session: SessionDep,
    settings: SettingsDep,
    after: After = None,
    limit: Limit20 = 20,
    stream: Annotated[
        bool, Query(description="Server-Sent Events of the events, oldest first, until the job is final.")
    ] = False,
    last_event_id: Annotated[
        str | None, Header(alias="Last-Event-ID", description="With stream=true: start after this event.")
    ] = None,
) -> Response:
    if stream:
        after_seq = _last_seq(session, job, last_event_id)
        state = request.app.state
        bus = getattr(state, "job_event_bus", None)
        if bus is None:
            bus = state.job_event_bus = JobEventBus.for_engine(state.engine)
        events = job_event_stream(
            bus,
            state.read_sessionmaker,
            job.id,
            after_seq=after_seq,
            heartbeat_seconds=settings.event_stream_heartbeat_seconds,
        )
        return StreamingResponse(
            events,
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )
    cursor = cursor_row(
        after, lambda id_: jobs.get_event(session, job.id, id_), f"No such event of job {job.id}"
    )
    rows = jobs.list_events(session, job.id, limit=limit + 1, after=cursor)
    return JSONResponse(list_page(rows, limit, event_object, ids=False))


@router.get(
    "/{fine_tuning_job_id}/checkpoints",
    summary="List a job's checkpoints, newest first",
    responses={**ok(FineTuningJobCheckpointList), **NOT_FOUND},
)
def list_checkpoints(
    job: JobDep, session: SessionDep, after: After = None, limit: Limit10 = 10
) -> JSONResponse:
    cursor = cursor_row(
        after,
        lambda id_: checkpoints.get_checkpoint(session, job.id, id_),
        f"No such checkpoint of job {job.id}",
    )
    rows = checkpoints.list_checkpoints(session, job.id, limit=limit + 1, after=cursor)
    return JSONResponse(list_page(rows, limit, lambda c: checkpoint_object(c, job)))


@router.get(
    "/{fine_tuning_job_id}/artifacts",
    summary="List a job's artifacts",
    responses={**ok(ArtifactList), **NOT_FOUND},
)
def list_artifacts(job: JobDep, session: SessionDep) -> JSONResponse:
    rows = checkpoints.list_artifacts(session, job.id)
    return JSONResponse({"object": "list", "data": [artifact_object(a) for a in rows], "has_more": False})


def _stream(store: ObjectStore, key: str, filename: str, content_type: str, size: int) -> StreamingResponse:
    try:
        handle = store.open(key)
    except ObjectNotFound:
        raise NotFound(f"The bytes of {filename} are not in the store.") from None

    def chunks() -> Any:
        with handle:
            while chunk := handle.read(1 << 20):
                yield chunk

    return StreamingResponse(
        chunks(),
        media_type=content_type,
        headers={"content-length": str(size), "content-disposition": content_disposition(filename)},
    )


@router.get(
    "/{fine_tuning_job_id}/artifacts/{name}",
    summary="Download an artifact (adapter, model, merged)",
    response_class=StreamingResponse,
    responses={**download("application/gzip", "application/octet-stream", redirect=True), **NOT_FOUND},
)
def download_artifact(
    job: JobDep, name: str, session: SessionDep, store: StoreDep, redirect: Redirect = False
) -> Response:
    artifact = checkpoints.get_artifact(session, job.id, name)
    if artifact is None:
        raise NotFound(f"Job {job.id} has no artifact named '{name}'.", param="name")
    if redirect and (url := store.presigned_url(artifact.storage_key)):
        return RedirectResponse(url, status_code=307)
    filename = (
        f"{job.id}-{name}.tar.gz" if artifact.content_type == "application/gzip" else f"{job.id}-{name}"
    )
    return _stream(store, artifact.storage_key, filename, artifact.content_type, artifact.bytes)


@router.get(
    "/{fine_tuning_job_id}/checkpoints/{checkpoint_id}/artifacts/adapter",
    summary="Download a checkpoint's adapter",
    response_class=StreamingResponse,
    responses={**download("application/gzip", redirect=True), **NOT_FOUND},
)
def download_checkpoint_adapter(
    job: JobDep, checkpoint_id: str, session: SessionDep, store: StoreDep, redirect: Redirect = False
) -> Response:
    checkpoint = checkpoints.get_checkpoint(session, job.id, checkpoint_id)
    if checkpoint is None:
        raise NotFound(f"Job {job.id} has no checkpoint {checkpoint_id}.", param="checkpoint_id")
    if redirect and (url := store.presigned_url(checkpoint.storage_key)):
        return RedirectResponse(url, status_code=307)
    try:
        size = store.stat(checkpoint.storage_key).size
    except ObjectNotFound:
        raise NotFound(f"The adapter of checkpoint {checkpoint_id} is not in the store.") from None
    return _stream(store, checkpoint.storage_key, f"{checkpoint_id}-adapter.tar.gz", "application/gzip", size)
