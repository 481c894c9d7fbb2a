"""NUL (`\\u0000`) is refused at the boundary, in every path parameter, query parameter and JSON
body, before any route runs: PostgreSQL's text and JSON operators cannot hold it, so one stored
NUL would break every later query that reads the row.

An ASGI middleware rather than per-field checks: it sees what every route sees. It costs a
substring test on the path and query, and on a JSON body a byte search for the `\\u0000` escape;
only a request that has one is parsed here, to name the field in the 400.
"""

from __future__ import annotations

import json
import urllib.parse
from typing import Any

from fastapi import FastAPI
from starlette.responses import JSONResponse
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tuneforge.api.errors import BadRequest, TuneforgeError

NUL = "\x00"
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# JSON bodies are small (a job spec, an estimate); a larger one is refused rather than held.
MAX_JSON_BODY_BYTES = 16 << 20


def _shown(name: str) -> str:
    return name.replace(NUL, "\\u0000")


def _refusal(param: str | None, where: str) -> BadRequest:
    named = f"'{param}'" if param else "the request"
    return BadRequest(
        f"Invalid value for {named}: the {where} contains a NUL character (\\u0000), which is not allowed.",
        param=param,
        code="invalid_value",
    )


def _too_large() -> TuneforgeError:
    return TuneforgeError(
        f"The JSON body is larger than {MAX_JSON_BODY_BYTES} bytes.",
        status_code=413,
        type="invalid_request_error",
        code="request_too_large",
    )


def find_nul(value: Any, path: str = "") -> str | None:
    """The dotted path (as error params name fields) of the first string, or object key, in a
    parsed JSON value that holds a NUL; None when there is none. Iterative: depth costs no stack."""
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack:
        item, at = stack.pop()
        if isinstance(item, str):
            if NUL in item:
                return at
        elif isinstance(item, dict):
            children = []
            for key, child in item.items():
                if NUL in key:
                    return at or _shown(key)
                children.append((child, f"{at}.{key}" if at else key))
            stack.extend(reversed(children))
        elif isinstance(item, list):
            stack.extend((child, f"{at}[{i}]") for i, child in reversed(list(enumerate(item))))
    return None


def _path_param(scope: Scope) -> str | None:
    """The name of the path parameter that holds the NUL, from the app's OpenAPI path templates
    (built once, only when a request has a NUL in its path)."""
    app = scope.get("app")
    if not isinstance(app, FastAPI):
        return None
    path = scope["path"]
    try:
        templates = list(app.openapi().get("paths", {}))
    except Exception:  # naming the field is a courtesy; the 400 stands without it
        return None
    for template in templates:
        regex, _, _ = compile_path(template)
        if match := regex.match(path):
            for name, value in match.groupdict().items():
                if NUL in value:
                    return str(name)
    return None


def _query_param(query_string: bytes) -> str | None:
    for name, value in urllib.parse.parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
        if NUL in name or NUL in value:
            return _shown(name)
    return None


def _may_be_json(scope: Scope) -> bool:
    """A JSON content type, or none at all (FastAPI then reads the body as JSON)."""
    for name, value in scope.get("headers", ()):
        if name == b"content-type":
            return b"json" in value.lower()
    return True


class RejectNul:
    """Answers 400, naming the field, for a request with a NUL in a path or query parameter or
    anywhere in its JSON body; passes every other request through unchanged."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if NUL in scope["path"]:
            await self._refuse(_refusal(_path_param(scope), "path"), scope, receive, send)
            return
        query = scope.get("query_string", b"")
        if b"%00" in query or b"\x00" in query:
            param = _query_param(query)
            if param is not None:
                await self._refuse(_refusal(param, "query parameter"), scope, receive, send)
                return
        if scope["method"] in _BODY_METHODS and _may_be_json(scope):
            body = await self._read_body(receive)
            if body is None:
                await self._refuse(_too_large(), scope, receive, send)
                return
            if b"\\u0000" in body and (field := self._nul_in_body(body)) is not None:
                await self._refuse(_refusal(field or None, "JSON body"), scope, receive, send)
                return
            receive = self._replay(body, receive)
        await self.app(scope, receive, send)

    @staticmethod
    async def _read_body(receive: Receive) -> bytes | None:
        """The whole body; None past MAX_JSON_BODY_BYTES."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_JSON_BODY_BYTES:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    @staticmethod
    def _nul_in_body(body: bytes) -> str | None:
        """The field holding a NUL ("" for the body itself); None when there is none (`\\\\u0000`
        is a backslash and text) or the body is not JSON that parses (the route answers that)."""
        try:
            value = json.loads(body)
        except (ValueError, RecursionError):
            return None
        return find_nul(value)

    @staticmethod
    def _replay(body: bytes, receive: Receive) -> Receive:
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay

    @staticmethod
    async def _refuse(error: TuneforgeError, scope: Scope, receive: Receive, send: Send) -> None:
        response = JSONResponse(
            error.body(), status_code=error.status_code, headers={"x-should-retry": "false"}
        )
        await response(scope, receive, send)
