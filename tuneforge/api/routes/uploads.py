"""/v1/uploads: OpenAI's Uploads API, large files in parts (the SDK's `upload_file_chunked`)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from tuneforge.api.deps import ProjectDep, SessionDep, SettingsDep, StoreDep
from tuneforge.api.errors import BadRequest
from tuneforge.api.responses import NOT_FOUND, TOO_LARGE, Upload, UploadPart, ok
from tuneforge.api.schemas import file_object, unix
from tuneforge.api.services import uploads as service
from tuneforge.db import after_commit, utcnow
from tuneforge.models import file as files
from tuneforge.models import upload as uploads
from tuneforge.models.upload import UploadStatus
from tuneforge.storage.keys import upload_part_key

router = APIRouter(prefix="/v1/uploads", tags=["uploads"])

UploadId = Annotated[str, Path(description="An upload id (upload_...).")]


class CreateUpload(BaseModel):
    model_config = ConfigDict(extra="forbid")
    filename: str = Field(max_length=4096, description="The file's name.")
    purpose: str = Field(max_length=64, description="fine-tune.")
    bytes: int = Field(description="The file's size in bytes; the parts must add up to it.")
    mime_type: str = Field(max_length=4096, description="The file's MIME type, e.g. application/jsonl.")
    expires_after: dict[str, Any] | None = Field(None, description="Accepted for OpenAI's shape; unused.")


class CompleteUpload(BaseModel):
    model_config = ConfigDict(extra="forbid")
    part_ids: list[str] = Field(max_length=200_000, description="The parts, in the file's order.")
    md5: str | None = Field(None, max_length=64, description="The md5 of the whole file, checked.")


_PART_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["data"],
                    "properties": {
                        "data": {"type": "string", "format": "binary", "description": "At most 64 MiB."}
                    },
                }
            }
        },
    }
}


def upload_object(row: uploads.Upload, file: files.File | None = None) -> dict[str, Any]:
    status = row.status
    if status == UploadStatus.PENDING and row.expires_at <= utcnow():
        status = UploadStatus.EXPIRED.value
    return {
        "id": row.id,
        "object": "upload",
        "bytes": row.bytes,
        "created_at": unix(row.created_at),
        "expires_at": unix(row.expires_at),
        "filename": row.filename,
        "purpose": row.purpose,
        "status": status,
        "file": file_object(file) if file is not None else None,
    }


@router.post("", summary="Create an upload (a file sent in parts)", responses={**ok(Upload), **TOO_LARGE})
def create_upload(
    body: CreateUpload, caller: ProjectDep, session: SessionDep, settings: SettingsDep
) -> JSONResponse:
    row = service.create(
        session,
        settings,
        caller.project_id,
        filename=body.filename,
        purpose=body.purpose,
        size=body.bytes,
        mime_type=body.mime_type,
    )
    return JSONResponse(upload_object(row))


@router.post(
    "/{upload_id}/parts",
    openapi_extra=_PART_BODY,
    summary="Add a part (at most 64 MiB) to an upload",
    responses={**ok(UploadPart), **NOT_FOUND, **TOO_LARGE},
)
async def add_part(
    upload_id: UploadId,
    request: Request,
    caller: ProjectDep,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
) -> JSONResponse:
    def check() -> int:
        announced = service.load_pending(session, caller.project_id, upload_id).bytes
        session.rollback()  # no transaction held open while the part streams
        return announced

    announced = await run_in_threadpool(check)
    part_id, size = await service.receive_part(request, store, settings, caller.project_id, upload_id)
    key = upload_part_key(upload_id, part_id)

    def record() -> uploads.UploadPart:
        service.load_pending(session, caller.project_id, upload_id)
        if uploads.parts_bytes(session, upload_id) + size > announced:
            raise BadRequest(
                f"The parts would hold more than the {announced} bytes the upload was created for.",
                param="data",
            )
        return uploads.add_part(session, part_id=part_id, upload_id=upload_id, size=size, storage_key=key)

    try:
        part = await run_in_threadpool(record)
    except BaseException:
        await run_in_threadpool(store.delete, key)
        raise
    return JSONResponse(
        {"id": part.id, "object": "upload.part", "created_at": unix(part.created_at), "upload_id": upload_id}
    )


@router.post(
    "/{upload_id}/complete",
    summary="Complete an upload: its parts, in order, become a file",
    responses={**ok(Upload), **NOT_FOUND, **TOO_LARGE},
)
async def complete_upload(
    upload_id: UploadId,
    body: CompleteUpload,
    caller: ProjectDep,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
) -> JSONResponse:
    def check() -> tuple[uploads.Upload, list[uploads.UploadPart]]:
        upload = service.load_pending(session, caller.project_id, upload_id)
        parts = service.ordered_parts(session, upload, body.part_ids)
        session.expunge(upload)
        for part in parts:
            session.expunge(part)
        session.rollback()  # no transaction held open while the file is assembled
        return upload, parts

    upload, parts = await run_in_threadpool(check)
    assembled = await service.assemble_async(store, settings, parts, body.md5)

    def record() -> tuple[uploads.Upload, files.File]:
        row = service.record_file(session, settings, upload, assembled)
        after_commit(session, lambda: service.drop_parts(store, upload_id))
        fresh = uploads.get_upload(session, caller.project_id, upload_id)
        assert fresh is not None
        return fresh, row

    try:
        fresh, file = await run_in_threadpool(record)
    except BaseException:
        await run_in_threadpool(store.delete, assembled.storage_key)
        raise
    return JSONResponse(upload_object(fresh, file))


@router.post(
    "/{upload_id}/cancel",
    summary="Cancel an upload; its parts are removed",
    responses={**ok(Upload), **NOT_FOUND},
)
def cancel_upload(
    upload_id: UploadId, caller: ProjectDep, session: SessionDep, store: StoreDep
) -> JSONResponse:
    upload = service.load_pending(session, caller.project_id, upload_id)
    if not uploads.finish(session, upload.id, UploadStatus.CANCELLED):
        raise BadRequest(f"Upload {upload_id} is no longer pending.", param="upload_id")
    session.refresh(upload)
    after_commit(session, lambda: service.drop_parts(store, upload_id))
    return JSONResponse(upload_object(upload))
