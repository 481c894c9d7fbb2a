"""A small HTTP client of the Tuneforge API (httpx): the calls the `tuneforge` client commands make.

It speaks the same routes the openai SDK does, plus Tuneforge's own (pause, resume, artifacts,
estimates). Every failure is a `ClientError` carrying one line: the API's own message for an
error answer, or what went wrong on the way (no connection, a timeout).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx

DEFAULT_API_URL = "http://127.0.0.1:8000/v1"
CHUNK = 1 << 20
# Files above this go through the Uploads API in parts (OpenAI's part limit is 64 MiB).
CHUNKED_THRESHOLD = 64 << 20
PART_SIZE = 64 << 20


class ClientError(Exception):
    """What the user sees: one line."""


@dataclass(frozen=True)
class Config:
    api_url: str
    api_key: str

    @classmethod
    def resolve(cls, api_url: str | None = None, api_key: str | None = None) -> Config:
        """Flags first, then TUNEFORGE_API_URL / TUNEFORGE_API_KEY, then OPENAI_BASE_URL /
        OPENAI_API_KEY; the URL defaults to a local `make run`."""
        url = (
            api_url
            or os.environ.get("TUNEFORGE_API_URL")
            or os.environ.get("OPENAI_BASE_URL")
            or DEFAULT_API_URL
        )
        key = api_key or os.environ.get("TUNEFORGE_API_KEY") or os.environ.get("OPENAI_API_KEY")
        if not key:
            raise ClientError("no API key: set TUNEFORGE_API_KEY (or OPENAI_API_KEY), or pass --api-key")
        return cls(url.rstrip("/"), key)


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("message"):
        param = f" (param: {error['param']})" if error.get("param") else ""
        return f"{response.status_code}: {error['message']}{param}"
    text = response.text.strip().splitlines()[0] if response.text.strip() else response.reason_phrase
    return f"{response.status_code}: {text}"


class _ProgressReader:
    """A file whose reads report how many bytes went out."""

    def __init__(self, handle: IO[bytes], on_bytes: Callable[[int], None]) -> None:
        self._handle = handle
        self._on_bytes = on_bytes

    def read(self, size: int = -1) -> bytes:
        data = self._handle.read(size)
        self._on_bytes(len(data))
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._handle.seek(offset, whence)

    def tell(self) -> int:
        return self._handle.tell()

    def fileno(self) -> int:
        return self._handle.fileno()


class Api:
    def __init__(self, config: Config, timeout: float = 600.0) -> None:
        self.config = config
        self._http = httpx.Client(
            base_url=config.api_url,
            headers={"Authorization": f"Bearer {config.api_key}"},
            timeout=httpx.Timeout(timeout, connect=10.0),
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Api:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ClientError(f"cannot reach {self.config.api_url}: {type(exc).__name__}: {exc}") from None
        if response.status_code >= 400:
            raise ClientError(_message(response))
        return response.json()

    # --- files ---
    def upload_file(
        self,
        path: Path,
        *,
        purpose: str = "fine-tune",
        chunked_threshold: int = CHUNKED_THRESHOLD,
        part_size: int = PART_SIZE,
        on_bytes: Callable[[int], None] = lambda n: None,
    ) -> dict[str, Any]:
        """One request for a small file; OpenAI's Uploads API (parts, then complete with the md5)
        for one above `chunked_threshold`. Returns the file object."""
        size = path.stat().st_size
        if size <= chunked_threshold:
            with path.open("rb") as handle:
                reader = _ProgressReader(handle, on_bytes)
                files = {"file": (path.name, reader, "application/jsonl")}
                return dict(self.request("POST", "/files", data={"purpose": purpose}, files=files))
        upload = self.request(
            "POST",
            "/uploads",
            json={"filename": path.name, "purpose": purpose, "bytes": size, "mime_type": "application/jsonl"},
        )
        md5 = hashlib.md5(usedforsecurity=False)
        part_ids: list[str] = []
        try:
            with path.open("rb") as handle:
                while data := handle.read(part_size):
                    md5.update(data)
                    part = self.request(
                        "POST", f"/uploads/{upload['id']}/parts", files={"data": (path.name, data)}
                    )
                    part_ids.append(part["id"])
                    on_bytes(len(data))
            done = self.request(
                "POST",
                f"/uploads/{upload['id']}/complete",
                json={"part_ids": part_ids, "md5": md5.hexdigest()},
            )
        except BaseException:
            with suppress(ClientError):
                self.request("POST", f"/uploads/{upload['id']}/cancel")
            raise
        return dict(done["file"])

    # --- jobs ---
    def create_job(self, body: dict[str, Any]) -> dict[str, Any]:
        return dict(self.request("POST", "/fine_tuning/jobs", json=body))

    def list_jobs(self, limit: int, after: str | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit}
        if after:
            params["after"] = after
        return dict(self.request("GET", "/fine_tuning/jobs", params=params))

    def get_job(self, job_id: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/fine_tuning/jobs/{job_id}"))

    def job_action(self, job_id: str, action: str) -> dict[str, Any]:
        return dict(self.request("POST", f"/fine_tuning/jobs/{job_id}/{action}"))

    def events(self, job_id: str, limit: int = 20, after: str | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit}
        if after:
            params["after"] = after
        return dict(self.request("GET", f"/fine_tuning/jobs/{job_id}/events", params=params))

    def artifacts(self, job_id: str) -> list[dict[str, Any]]:
        return list(self.request("GET", f"/fine_tuning/jobs/{job_id}/artifacts")["data"])

    @contextmanager
    def artifact_stream(self, job_id: str, name: str) -> Iterator[httpx.Response]:
        try:
            with self._http.stream(
                "GET", f"/fine_tuning/jobs/{job_id}/artifacts/{name}", follow_redirects=True
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    raise ClientError(_message(response))
                yield response
        except httpx.HTTPError as exc:
            raise ClientError(f"download failed: {type(exc).__name__}: {exc}") from None
