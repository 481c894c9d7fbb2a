"""OpenAI's Uploads API: a file announced (`create`), sent in parts of up to 64 MiB (`receive_part`),
then turned into an ordinary file (`complete`) or dropped (`cancel`).

Each part is an object of its own in the store (`uploads/{id}/parts/{part_id}`), whatever its size:
S3's own multipart upload wants parts of 5 MiB or more (all but the last) and numbered in advance,
while OpenAI takes parts of any size and learns their order only at completion. Completion reads
the parts back in the client's order, checks the bytes line by line with the same
`JsonlInspector` a one-request upload uses (a line split across two parts is one line; line
numbers count from the start of the file) and writes them as one object, which the store sends as
its own multipart upload on S3. Memory stays flat: a chunk at a time, one line pending, and the
store's one part buffer.
"""

from __future__ import annotations

import collections
import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from sqlalchemy.orm import Session
from starlette.requests import Request

from tuneforge.api import quotas
from tuneforge.api.errors import BadRequest, NotFound, PayloadTooLarge
from tuneforge.api.services.files import (
    MULTIPART_OVERHEAD,
    UPLOAD_THREADS,
    TooManyUploads,
    body_reader,
    clean_filename,
)
from tuneforge.config import Settings
from tuneforge.db import utcnow
from tuneforge.models import file as files
from tuneforge.models import upload as uploads
from tuneforge.models.upload import UploadStatus
from tuneforge.storage import ObjectNotFound, ObjectStore
from tuneforge.storage.keys import file_key, upload_part_key, upload_prefix
from tuneforge.training.formats import FileStats, FormatError, JsonlInspector

log = logging.getLogger(__name__)

MAX_PART_BYTES = 64 << 20  # OpenAI's limit, and the SDK's default part size
MAX_FORM_PARTS = 8
MAX_MIME_TYPE = 255

# Parts arriving now, per project, in this API process (touched on the event loop only).
_RUNNING: collections.Counter[str] = collections.Counter()


def create(
    session: Session,
    settings: Settings,
    project_id: str,
    *,
    filename: str,
    purpose: str,
    size: int,
    mime_type: str,
) -> uploads.Upload:
    if purpose != files.PURPOSE_FINE_TUNE:
        raise BadRequest(
            f"purpose must be '{files.PURPOSE_FINE_TUNE}' for uploads, not {purpose!r}.", param="purpose"
        )
    if size < 1:
        raise BadRequest("bytes must be a positive number of bytes.", param="bytes")
    limit = settings.max_chunked_upload_bytes
    if size > limit:
        raise PayloadTooLarge(
            f"bytes ({size}) is larger than the upload limit of {limit} bytes.", param="bytes"
        )
    if not mime_type.strip() or len(mime_type) > MAX_MIME_TYPE:
        raise BadRequest(f"mime_type must be 1 to {MAX_MIME_TYPE} characters.", param="mime_type")
    if settings.max_stored_bytes_per_project:
        quotas.check_storage(session, settings, project_id, size, lock=False)
    now = utcnow()
    return uploads.add_upload(
        session,
        project_id=project_id,
        filename=clean_filename(filename),
        purpose=purpose,
        mime_type=mime_type.strip(),
        size=size,
        expires_at=now + timedelta(seconds=settings.chunked_upload_expires_seconds),
    )


def load_pending(session: Session, project_id: str, upload_id: str) -> uploads.Upload:
    """The caller's upload, still taking parts; 404 for another project's or an unknown one."""
    row = uploads.get_upload(session, project_id, upload_id)
    if row is None:
        raise NotFound(f"No such Upload object: {upload_id}", param="upload_id")
    if row.status == UploadStatus.EXPIRED or (
        row.status == UploadStatus.PENDING and row.expires_at <= utcnow()
    ):
        raise BadRequest(f"Upload {upload_id} has expired.", param="upload_id", code="upload_expired")
    if row.status != UploadStatus.PENDING:
        raise BadRequest(f"Upload {upload_id} is already {row.status}.", param="upload_id")
    return row


class _PartReader:
    """Feeds the request body to a multipart parser and hands out the `data` field's bytes."""

    def __init__(self, boundary: bytes, next_chunk: Any) -> None:
        self.next_chunk = next_chunk
        self.size = 0
        self.data_seen = False
        self.parts = 0
        self._in_data = False
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._disposition = ""
        self._header_bytes = 0
        self._pending: list[bytes] = []
        self._parser = MultipartParser(
            boundary,
            callbacks={
                "on_part_begin": self._on_part_begin,
                "on_header_field": self._on_header_field,
                "on_header_value": self._on_header_value,
                "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished,
                "on_part_data": self._on_part_data,
                "on_part_end": self._on_part_end,
            },
        )

    def _on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_FORM_PARTS:
            raise BadRequest(f"The request has more than {MAX_FORM_PARTS} parts.", param="data")
        self._disposition = ""
        self._header_bytes = 0

    def _count(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > 16 << 10:
            raise BadRequest("A part's headers are too long.", param="data")

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._count(end - start)
        self._header_name += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._count(end - start)
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        if self._header_name.decode("latin-1").strip().lower() == "content-disposition":
            self._disposition = self._header_value.decode("latin-1")
        self._header_name.clear()
        self._header_value.clear()

    def _on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        self._in_data = options.get(b"name") == b"data" and not self.data_seen
        self.data_seen = self.data_seen or self._in_data

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_data:
            self.size += end - start
            if self.size > MAX_PART_BYTES:
                raise PayloadTooLarge(f"A part may hold at most {MAX_PART_BYTES} bytes.", param="data")
            self._pending.append(data[start:end])

    def _on_part_end(self) -> None:
        self._in_data = False

    def data_chunks(self) -> Iterator[bytes]:
        while True:
            chunk = self.next_chunk()
            try:
                if chunk is None:
                    self._parser.finalize()
                else:
                    self._parser.write(chunk)
            except FormParserError as exc:
                raise BadRequest(f"The multipart body is malformed: {exc}", param="data") from None
            pending, self._pending = self._pending, []
            yield from pending
            if chunk is None:
                return


async def receive_part(
    request: Request, store: ObjectStore, settings: Settings, project_id: str, upload_id: str
) -> tuple[str, int]:
    """Streams the request's `data` field into the store as a new part; returns (part id, bytes).
    On any error nothing is left behind. A project already sending
    `max_concurrent_uploads_per_project` parts in this process gets a 429 (the SDK retries)."""
    limit = settings.max_concurrent_uploads_per_project
    if _RUNNING[project_id] >= limit:
        raise TooManyUploads(
            f"This project already sends {limit} parts at once; retry when one has finished.", param="data"
        )
    _RUNNING[project_id] += 1
    try:
        return await _receive_part(request, store, settings, upload_id)
    finally:
        _RUNNING[project_id] -= 1
        if _RUNNING[project_id] <= 0:
            del _RUNNING[project_id]


async def _receive_part(
    request: Request, store: ObjectStore, settings: Settings, upload_id: str
) -> tuple[str, int]:
    content_type, options = parse_options_header(request.headers.get("content-type"))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise BadRequest("Send the part as multipart/form-data with a 'data' field.", param="data")
    max_body = MAX_PART_BYTES + MULTIPART_OVERHEAD
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body:
        raise PayloadTooLarge(f"A part may hold at most {MAX_PART_BYTES} bytes.", param="data")
    next_body_chunk = body_reader(
        request,
        max_body=max_body,
        idle_seconds=settings.upload_idle_timeout_seconds,
        param="data",
        too_large=f"A part may hold at most {MAX_PART_BYTES} bytes.",
    )

    reader = _PartReader(boundary, lambda: anyio.from_thread.run(next_body_chunk))
    part_id = uploads.new_part_id()
    key = upload_part_key(upload_id, part_id)

    def store_part() -> int:
        size = store.put_stream(key, reader.data_chunks())
        if not reader.data_seen:
            raise BadRequest("The request has no 'data' field.", param="data")
        if size == 0:
            raise BadRequest("A part must hold at least one byte.", param="data")
        return size

    try:
        size = await anyio.to_thread.run_sync(store_part, limiter=UPLOAD_THREADS)
    except BaseException:
        await anyio.to_thread.run_sync(store.delete, key)
        raise
    return part_id, size


@dataclass
class Assembled:
    """The parts written as one object under `storage_key`, checked."""

    file_id: str
    storage_key: str
    size: int
    stats: FileStats


def ordered_parts(session: Session, upload: uploads.Upload, part_ids: list[str]) -> list[uploads.UploadPart]:
    """The parts the client names, in its order; each must be one of this upload's, named once,
    and together they must hold the `bytes` announced at creation."""
    if not part_ids:
        raise BadRequest("part_ids must name at least one part.", param="part_ids")
    if len(set(part_ids)) != len(part_ids):
        raise BadRequest("part_ids names a part more than once.", param="part_ids")
    known = uploads.get_parts(session, upload.id)
    chosen = []
    for index, part_id in enumerate(part_ids):
        part = known.get(part_id)
        if part is None:
            raise BadRequest(
                f"part_ids[{index}] ({part_id}) is not a part of this upload.", param=f"part_ids.{index}"
            )
        chosen.append(part)
    total = sum(part.bytes for part in chosen)
    if total != upload.bytes:
        raise BadRequest(
            f"The parts hold {total} bytes, but the upload was created for {upload.bytes} bytes.",
            param="part_ids",
        )
    return chosen


def assemble(
    store: ObjectStore, settings: Settings, parts: list[uploads.UploadPart], md5: str | None
) -> Assembled:
    """Reads the parts in order, checks every line, writes one object (blocking: run it in a
    thread). Raises BadRequest naming the first bad line, or a wrong md5; leaves nothing behind."""
    inspector = JsonlInspector(max_line_bytes=settings.max_upload_line_bytes)
    digest = hashlib.md5(usedforsecurity=False)
    file_id = files.new_file_id()
    key = file_key(file_id)

    def chunks() -> Iterator[bytes]:
        for part in parts:
            try:
                pieces = store.iter_chunks(part.storage_key)
                for piece in pieces:
                    inspector.feed(piece)
                    digest.update(piece)
                    yield piece
            except ObjectNotFound:
                raise BadRequest(f"Part {part.id} is gone from the store.", param="part_ids") from None

    try:
        size = store.put_stream(key, chunks())
        stats = inspector.finish()
        if md5 is not None and digest.hexdigest() != md5.strip().lower():
            raise BadRequest(
                f"The md5 of the uploaded bytes is {digest.hexdigest()}, not {md5}.",
                param="md5",
                code="md5_mismatch",
            )
    except FormatError as exc:
        store.delete(key)
        raise BadRequest(
            f"Invalid file format on line {exc.line}: {exc.reason}.",
            param="part_ids",
            code="invalid_file_format",
        ) from None
    except BaseException:
        store.delete(key)
        raise
    return Assembled(file_id, key, size, stats)


async def assemble_async(
    store: ObjectStore, settings: Settings, parts: list[uploads.UploadPart], md5: str | None
) -> Assembled:
    return await anyio.to_thread.run_sync(assemble, store, settings, parts, md5, limiter=UPLOAD_THREADS)


def record_file(
    session: Session, settings: Settings, upload: uploads.Upload, assembled: Assembled
) -> files.File:
    """The file row, and the upload marked completed; raises when the upload stopped being
    pending meanwhile (cancelled, expired, completed by a concurrent request)."""
    if not uploads.finish(session, upload.id, UploadStatus.COMPLETED, assembled.file_id):
        raise BadRequest(f"Upload {upload.id} is no longer pending.", param="upload_id")
    quotas.check_storage(session, settings, upload.project_id, assembled.size)
    row = files.add_file(
        session,
        file_id=assembled.file_id,
        project_id=upload.project_id,
        filename=upload.filename,
        purpose=upload.purpose,
        size=assembled.size,
        storage_key=assembled.storage_key,
        format=assembled.stats.format.value,
        examples=assembled.stats.examples,
        approx_tokens=assembled.stats.approx_tokens,
        field_stats=assembled.stats.fields.as_dict(),
    )
    return row


def drop_parts(store: ObjectStore, upload_id: str) -> None:
    """Removes an ended upload's part objects (after the commit that ended it); their rows, and
    any object this misses, go with the reconciler's next pass."""
    try:
        store.delete_prefix(upload_prefix(upload_id))
    except Exception:
        log.exception("could not delete the parts of upload %s; the reconciler retries", upload_id)
