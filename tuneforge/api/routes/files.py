"""/v1/files: upload, list, retrieve, download and delete training files."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

from tuneforge.api import quotas
from tuneforge.api.deps import FileDep, ProjectDep, SessionDep, SettingsDep, StoreDep
from tuneforge.api.errors import BadRequest
from tuneforge.api.responses import NOT_FOUND, TOO_LARGE, Deleted, FileList, FileObject, download, ok
from tuneforge.api.schemas import file_object, list_page
from tuneforge.api.services.files import content_disposition, receive_upload
from tuneforge.db import after_commit
from tuneforge.models import file as files
from tuneforge.storage import ObjectNotFound

router = APIRouter(prefix="/v1/files", tags=["files"])

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "purpose"],
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "JSONL data."},
                        "purpose": {"type": "string", "enum": ["fine-tune"]},
                    },
                }
            }
        },
    }
}


@router.post(
    "",
    openapi_extra=_UPLOAD_BODY,
    summary="Upload a JSONL training file",
    responses={**ok(FileObject), **TOO_LARGE},
)
async def upload_file(
    request: Request, caller: ProjectDep, session: SessionDep, settings: SettingsDep, store: StoreDep
) -> JSONResponse:
    if settings.max_stored_bytes_per_project:  # a full project is refused before its body is read
        await run_in_threadpool(quotas.check_storage, session, settings, caller.project_id, 1, lock=False)
    upload = await receive_upload(request, store, settings, caller.project_id)

    def record() -> files.File:
        quotas.check_storage(session, settings, caller.project_id, upload.size)
        return files.add_file(
            session,
            file_id=upload.file_id,
            project_id=caller.project_id,
            filename=upload.filename,
            purpose=upload.purpose,
            size=upload.size,
            storage_key=upload.storage_key,
            format=upload.stats.format.value,
            examples=upload.stats.examples,
            approx_tokens=upload.stats.approx_tokens,
            field_stats=upload.stats.fields.as_dict(),
            expires_at=upload.expires_at,
        )

    try:
        row = await run_in_threadpool(record)
    except BaseException:
        await run_in_threadpool(store.delete, upload.storage_key)
        raise
    return JSONResponse(file_object(row))


@router.get("", summary="List files", responses=ok(FileList))
def list_files(
    caller: ProjectDep,
    session: SessionDep,
    after: Annotated[str | None, Query(description="A file id: the page starts after it.")] = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
    order: Annotated[Literal["asc", "desc"], Query()] = "desc",
    purpose: Annotated[str | None, Query()] = None,
) -> JSONResponse:
    cursor = None
    if after is not None:
        cursor = files.get_file(session, caller.project_id, after)
        if cursor is None:
            raise BadRequest(f"No such File object: {after}", param="after")
    rows = files.list_files(
        session, caller.project_id, limit=limit + 1, after=cursor, purpose=purpose, ascending=order == "asc"
    )
    return JSONResponse(list_page(rows, limit, file_object))


@router.get("/{file_id}", summary="Retrieve a file", responses={**ok(FileObject), **NOT_FOUND})
async def retrieve_file(file: FileDep) -> JSONResponse:
    return JSONResponse(file_object(file))


@router.get(
    "/{file_id}/content",
    summary="Download a file's bytes",
    response_class=StreamingResponse,
    responses={**download("application/octet-stream", "text/csv"), **NOT_FOUND},
)
def file_content(file: FileDep, store: StoreDep) -> StreamingResponse:
    try:
        handle = store.open(file.storage_key)
    except ObjectNotFound:
        raise BadRequest(f"The content of file {file.id} is gone from the store.", param="file_id") from None

    def chunks() -> Any:
        with handle:
            while chunk := handle.read(1 << 20):
                yield chunk

    media_type = "text/csv" if file.filename.endswith(".csv") else "application/octet-stream"
    return StreamingResponse(
        chunks(),
        media_type=media_type,
        headers={
            "content-length": str(file.bytes),
            "content-disposition": content_disposition(file.filename),
        },
    )


@router.delete("/{file_id}", summary="Delete a file", responses={**ok(Deleted), **NOT_FOUND})
def delete_file(file: FileDep, caller: ProjectDep, session: SessionDep, store: StoreDep) -> JSONResponse:
    files.delete_file(session, caller.project_id, file.id)
    key = file.storage_key
    after_commit(session, lambda: store.delete(key))
    return JSONResponse({"id": file.id, "object": "file", "deleted": True})
