"""Uploads: the multipart body streams to the object store in chunks while `JsonlInspector`
checks each line, so memory stays flat whatever the file's size.

The body is read on the event loop and parsed in a worker thread (the store's `put_stream` is
synchronous): the thread pulls each chunk from the loop as the store asks for more.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from tuneforge.api.errors import BadRequest, PayloadTooLarge
from tuneforge.models import file as files
from tuneforge.storage import ObjectStore
from tuneforge.training.formats import FileStats, FormatError, JsonlInspector

# Uploads hold a thread for as long as the client sends; they get their own threads so that a
# few slow uploads never starve the (small) pool that runs database work.
UPLOAD_THREADS = anyio.CapacityLimiter(32)

# Room for the multipart framing and the small form fields beside the file.
MULTIPART_OVERHEAD = 1 << 20
MAX_FIELD_BYTES = 64 << 10
MAX_FILENAME = 512


@dataclass
class Upload:
    """A file whose bytes are in the store and whose content passed the checks."""

    file_id: str
    storage_key: str
    filename: str
    purpose: str
    size: int
    stats: FileStats
    expires_at: datetime | None


@dataclass
class _Part:
    headers: dict[str, str] = field(default_factory=dict)
    name: str | None = None
    filename: str | None = None


class _MultipartPump:
    """Feeds body chunks to the multipart parser and hands out the `file` part's bytes."""

    def __init__(self, boundary: bytes, next_chunk: Any, max_bytes: int) -> None:
        self.next_chunk = next_chunk
        self.max_bytes = max_bytes
        self.fields: dict[str, bytearray] = {}
        self.filename: str | None = None
        self.file_seen = False
        self.size = 0
        self.inspector = JsonlInspector()
        self._part = _Part()
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._pending: list[bytes] = []
        self._in_file = False
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
        self._part = _Part()

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        name = self._header_field.decode("latin-1").strip().lower()
        self._part.headers[name] = self._header_value.decode("latin-1").strip()
        self._header_field.clear()
        self._header_value.clear()

    def _on_headers_finished(self) -> None:
        _, options = parse_options_header(self._part.headers.get("content-disposition", ""))
        name = options.get(b"name")
        filename = options.get(b"filename")
        self._part.name = name.decode("utf-8", "replace") if name is not None else None
        self._part.filename = filename.decode("utf-8", "replace") if filename is not None else None
        self._in_file = self._part.name == "file" and not self.file_seen
        if self._in_file:
            self.file_seen = True
            self.filename = (self._part.filename or "upload.jsonl")[:MAX_FILENAME]

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            piece = data[start:end]
            self.size += len(piece)
            if self.size > self.max_bytes:
                raise PayloadTooLarge(
                    f"The file is larger than the upload limit of {self.max_bytes} bytes.", param="file"
                )
            self.inspector.feed(piece)
            self._pending.append(piece)
        elif self._part.name is not None:
            value = self.fields.setdefault(self._part.name, bytearray())
            value += data[start:end]
            if len(value) > MAX_FIELD_BYTES:
                raise BadRequest(f"Form field '{self._part.name}' is too long.", param=self._part.name)

    def _on_part_end(self) -> None:
        self._in_file = False

    def file_chunks(self) -> Iterator[bytes]:
        """The file's bytes, as the store asks for them; reads the whole body (fields after the
        file part included) before it ends."""
        while True:
            chunk = self.next_chunk()
            if chunk is None:
                self._parser.finalize()
                yield from self._drain()
                return
            self._parser.write(chunk)
            yield from self._drain()

    def _drain(self) -> Iterator[bytes]:
        pending, self._pending = self._pending, []
        yield from pending

    def field(self, name: str) -> str | None:
        value = self.fields.get(name)
        return value.decode("utf-8", "replace").strip() if value is not None else None


def _boundary(request: Request) -> bytes:
    content_type, options = parse_options_header(request.headers.get("content-type"))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise BadRequest(
            "Upload the file as multipart/form-data with a 'file' part and a 'purpose' field.",
            param="file",
        )
    return boundary


def _expires_at(pump: _MultipartPump, now: datetime) -> datetime | None:
    anchor = pump.field("expires_after[anchor]")
    seconds = pump.field("expires_after[seconds]")
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at":
        raise BadRequest("expires_after[anchor] must be 'created_at'.", param="expires_after.anchor")
    try:
        value = int(seconds or "")
    except ValueError:
        raise BadRequest(
            "expires_after[seconds] must be an integer.", param="expires_after.seconds"
        ) from None
    if not 3600 <= value <= 2592000:
        raise BadRequest(
            "expires_after[seconds] must be between 3600 (1 hour) and 2592000 (30 days).",
            param="expires_after.seconds",
        )
    return now + timedelta(seconds=value)


async def receive_upload(request: Request, store: ObjectStore, max_bytes: int) -> Upload:
    """Streams the request's `file` part into the store, checking it line by line. On any
    error nothing is left behind: the partial object is deleted and the error raised."""
    boundary = _boundary(request)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes + MULTIPART_OVERHEAD:
        raise PayloadTooLarge(
            f"The upload ({declared} bytes) is larger than the limit of {max_bytes} bytes.", param="file"
        )

    body: AsyncIterator[bytes] = request.stream()

    async def next_body_chunk() -> bytes | None:
        async for chunk in body:
            if chunk:
                return chunk
        return None

    def next_chunk() -> bytes | None:
        return anyio.from_thread.run(next_body_chunk)

    pump = _MultipartPump(boundary, next_chunk, max_bytes)
    file_id = files.new_file_id()
    key = files.storage_key_for(file_id)

    def store_and_check() -> tuple[int, FileStats]:
        size = store.put_stream(key, pump.file_chunks())
        if not pump.file_seen:
            raise BadRequest("The upload has no 'file' part.", param="file")
        purpose = pump.field("purpose")
        if purpose != files.PURPOSE_FINE_TUNE:
            raise BadRequest(
                f"purpose must be '{files.PURPOSE_FINE_TUNE}' for uploads, not {purpose!r}.",
                param="purpose",
            )
        return size, pump.inspector.finish()

    try:
        size, stats = await anyio.to_thread.run_sync(store_and_check, limiter=UPLOAD_THREADS)
    except FormatError as exc:
        await anyio.to_thread.run_sync(store.delete, key)
        raise BadRequest(
            f"Invalid file format on line {exc.line}: {exc.reason}.", param="file", code="invalid_file_format"
        ) from None
    except BaseException:
        await anyio.to_thread.run_sync(store.delete, key)
        raise
    try:
        expires_at = _expires_at(pump, datetime.now(UTC))
    except BadRequest:
        await anyio.to_thread.run_sync(store.delete, key)
        raise
    return Upload(
        file_id=file_id,
        storage_key=key,
        filename=pump.filename or "upload.jsonl",
        purpose=files.PURPOSE_FINE_TUNE,
        size=size,
        stats=stats,
        expires_at=expires_at,
    )
