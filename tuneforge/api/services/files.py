"""Uploads: the multipart body streams to the object store in chunks while `JsonlInspector`
checks each line, so memory stays flat whatever the file's size.

The body is read on the event loop and parsed in a worker thread (the store's `put_stream` is
synchronous): the thread pulls each chunk from the loop as the store asks for more.

What one request may cost is bounded: the body's total bytes (also when it comes chunked, with
no Content-Length), the number of parts and the bytes of their headers and fields, the length of
one JSONL line, the time the client may send nothing, and the uploads one project runs at once.
"""

from __future__ import annotations

import collections
import logging
import re
import unicodedata
import urllib.parse
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from tuneforge.api.errors import BadRequest, PayloadTooLarge, RateLimitExceeded, TuneforgeError
from tuneforge.config import Settings
from tuneforge.models import file as files
from tuneforge.storage import ObjectStore
from tuneforge.storage.keys import file_key
from tuneforge.training.formats import FileStats, FormatError, JsonlInspector

log = logging.getLogger(__name__)

# Uploads hold a thread for as long as the client sends; they get their own threads so that a
# few slow uploads never starve the (small) pool that runs database work.
UPLOAD_THREADS = anyio.CapacityLimiter(32)

# Room for the multipart framing and the small form fields beside the file.
MULTIPART_OVERHEAD = 1 << 20
# The form fields an upload reads; any other part's bytes are skipped, never buffered.
KNOWN_FIELDS = frozenset({"purpose", "expires_after[anchor]", "expires_after[seconds]"})
MAX_FIELD_BYTES = 4 << 10
MAX_PARTS = 16
MAX_PART_HEADER_BYTES = 16 << 10
MAX_FILENAME = 255
DEFAULT_FILENAME = "upload.jsonl"

_FILENAME_STAR = re.compile(r"filename\*\s*=\s*(?:UTF-8|utf-8)''([^;\s]+)")


class TooManyUploads(RateLimitExceeded):
    """The project already runs as many uploads as it may. A slot frees when one of them ends, so
    the SDK may retry after a moment."""

    headers = {"retry-after": "1", "x-should-retry": "true"}


class UploadTimeout(TuneforgeError):
    status_code = 408
    type = "invalid_request_error"

    def __init__(self, message: str, **kwargs: Any) -> None:
        kwargs.setdefault("code", "upload_timeout")
        super().__init__(message, **kwargs)


# Uploads running now, per project, in this API process (touched on the event loop only).
_RUNNING: collections.Counter[str] = collections.Counter()


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
    header_bytes: int = 0


def clean_filename(raw: str | None) -> str:
    """The base name a client sent, without directories (`../../etc/passwd` -> `passwd`, also
    with backslashes) and without control characters; `upload.jsonl` when nothing is left."""
    name = (raw or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if unicodedata.category(c)[0] != "C").strip()
    if name in ("", ".", ".."):
        return DEFAULT_FILENAME
    return name[:MAX_FILENAME]


def content_disposition(filename: str) -> str:
    """An attachment header any client can read (RFC 6266): an ASCII `filename=` fallback and the
    exact name, percent-encoded UTF-8, in `filename*=` (RFC 5987)."""
    fallback = (
        "".join(c if 0x20 <= ord(c) < 0x7F and c not in '"\\' else "_" for c in filename) or DEFAULT_FILENAME
    )
    if fallback == filename:
        return f'attachment; filename="{filename}"'
    encoded = urllib.parse.quote(filename, safe="")
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{encoded}"


class _MultipartPump:
    """Feeds body chunks to the multipart parser and hands out the `file` part's bytes."""

    def __init__(self, boundary: bytes, next_chunk: Any, max_bytes: int, max_line_bytes: int) -> None:
        self.next_chunk = next_chunk
        self.max_bytes = max_bytes
        self.fields: dict[str, bytearray] = {}
        self.filename: str | None = None
        self.file_seen = False
        self.size = 0
        self.parts = 0
        self.inspector = JsonlInspector(max_line_bytes=max_line_bytes)
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
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise BadRequest(f"The upload has more than {MAX_PARTS} parts.", param="file")
        self._part = _Part()

    def _count_header(self, size: int) -> None:
        self._part.header_bytes += size
        if self._part.header_bytes > MAX_PART_HEADER_BYTES:
            raise BadRequest(f"A part's headers are longer than {MAX_PART_HEADER_BYTES} bytes.", param="file")

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self._header_field += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        name = self._header_field.decode("latin-1").strip().lower()
        self._part.headers[name] = self._header_value.decode("latin-1").strip()
        self._header_field.clear()
        self._header_value.clear()

    def _on_headers_finished(self) -> None:
        disposition = self._part.headers.get("content-disposition", "")
        _, options = parse_options_header(disposition)
        name = options.get(b"name")
        filename = options.get(b"filename")
        self._part.name = name.decode("utf-8", "replace") if name is not None else None
        self._part.filename = filename.decode("utf-8", "replace") if filename is not None else None
        if extended := _FILENAME_STAR.search(disposition):
            raw = urllib.parse.unquote_to_bytes(extended.group(1))
            self._part.filename = raw.decode("utf-8", "replace")
        self._in_file = self._part.name == "file" and not self.file_seen
        if self._in_file:
            self.file_seen = True
            self.filename = clean_filename(self._part.filename)

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
        elif self._part.name in KNOWN_FIELDS:
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
            try:
                if chunk is None:
                    self._parser.finalize()
                else:
                    self._parser.write(chunk)
            except FormParserError as exc:
                raise BadRequest(f"The multipart body is malformed: {exc}", param="file") from None
            yield from self._drain()
            if chunk is None:
                return

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


async def receive_upload(request: Request, store: ObjectStore, settings: Settings, project_id: str) -> Upload:
    """Streams the request's `file` part into the store, checking it line by line. On any
    error nothing is left behind: the partial object is deleted and the error raised. A project
    already running `max_concurrent_uploads_per_project` uploads in this process gets a 429."""
    limit = settings.max_concurrent_uploads_per_project
    if _RUNNING[project_id] >= limit:
        raise TooManyUploads(
            f"This project already has {limit} uploads in progress; retry when one has finished.",
            param="file",
        )
    _RUNNING[project_id] += 1
    try:
        return await _receive(request, store, settings)
    finally:
        _RUNNING[project_id] -= 1
        if _RUNNING[project_id] <= 0:
            del _RUNNING[project_id]


def body_reader(
    request: Request, *, max_body: int, idle_seconds: float, param: str, too_large: str
) -> Callable[[], Coroutine[Any, Any, bytes | None]]:
    """The request body's next non-empty chunk on each call (None at its end): a body past
    `max_body` bytes is a 413 (`too_large`), no data for `idle_seconds` a 408, a client that hangs
    up a 400, each naming `param`."""
    body: AsyncIterator[bytes] = request.stream()
    received = 0

    async def next_body_chunk() -> bytes | None:
        nonlocal received
        try:
            with anyio.fail_after(idle_seconds):
                async for chunk in body:
                    if chunk:
                        received += len(chunk)
                        if received > max_body:
                            raise PayloadTooLarge(too_large, param=param)
                        return chunk
        except ClientDisconnect:
            raise BadRequest("The client closed the connection during the upload.", param=param) from None
        except TimeoutError:
            raise UploadTimeout(
                f"The upload sent no data for {idle_seconds:g} seconds.", param=param
            ) from None
        return None

    return next_body_chunk


async def _receive(request: Request, store: ObjectStore, settings: Settings) -> Upload:
    max_bytes = settings.max_upload_bytes
    max_body = max_bytes + MULTIPART_OVERHEAD
    idle = settings.upload_idle_timeout_seconds
    boundary = _boundary(request)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body:
        raise PayloadTooLarge(
            f"The upload ({declared} bytes) is larger than the limit of {max_bytes} bytes.", param="file"
        )

    next_body_chunk = body_reader(
        request,
        max_body=max_body,
        idle_seconds=idle,
        param="file",
        too_large=f"The upload is larger than the limit of {max_bytes} bytes.",
    )

    def next_chunk() -> bytes | None:
        return anyio.from_thread.run(next_body_chunk)

    pump = _MultipartPump(boundary, next_chunk, max_bytes, settings.max_upload_line_bytes)
    file_id = files.new_file_id()
    key = file_key(file_id)

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
        filename=pump.filename or DEFAULT_FILENAME,
        purpose=files.PURPOSE_FINE_TUNE,
        size=size,
        stats=stats,
        expires_at=expires_at,
    )


@asynccontextmanager
async def sweeping_incomplete_writes(
    store: ObjectStore, max_age_seconds: float, every_seconds: float = 3600.0
) -> AsyncIterator[None]:
    """While open, removes what writes killed part-way left in the store (an API process killed
    during an upload leaves its temporary file): once at once, then every `every_seconds`, those
    older than `max_age_seconds`."""

    async def sweep() -> None:
        while True:
            older_than = datetime.now(UTC) - timedelta(seconds=max_age_seconds)
            try:
                removed = await anyio.to_thread.run_sync(store.remove_incomplete_writes, older_than)
            except Exception:
                log.exception("removing incomplete writes from the object store failed")
            else:
                if removed:
                    log.info("removed %d incomplete writes from the object store", removed)
            await anyio.sleep(every_seconds)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(sweep)
        try:
            yield
        finally:
            tasks.cancel_scope.cancel()
