"""One error hierarchy carrying its HTTP status, and the handlers that turn errors into OpenAI's
body: `{"error": {"message", "type", "param", "code"}}`.

Validation errors answer 400 (never 422) with `param` the dotted path of the field, as a client
wrote it: without FastAPI's leading "body"/"query" and without pydantic's union-member tags.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException

from tuneforge.db import DATABASE_UNREACHABLE_ERRORS
from tuneforge.models.job import InvalidTransition

log = logging.getLogger(__name__)


class TuneforgeError(Exception):
    status_code = 500
    type = "server_error"
    #: Extra response headers (a 429's Retry-After); they override the x-should-retry default.
    headers: dict[str, str] | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status_code: int | None = None,
        type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        if status_code is not None:
            self.status_code = status_code
        if type is not None:
            self.type = type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class BadRequest(TuneforgeError):
    status_code = 400
    type = "invalid_request_error"


class Unauthorized(TuneforgeError):
    status_code = 401
    type = "invalid_request_error"

    def __init__(self, message: str = "Missing or invalid API key.", **kwargs: Any) -> None:
        kwargs.setdefault("code", "invalid_api_key")
        super().__init__(message, **kwargs)


class Forbidden(TuneforgeError):
    status_code = 403
    type = "invalid_request_error"


class NotFound(TuneforgeError):
    status_code = 404
    type = "invalid_request_error"

    def __init__(self, message: str, **kwargs: Any) -> None:
        kwargs.setdefault("code", "not_found")
        super().__init__(message, **kwargs)


class PayloadTooLarge(TuneforgeError):
    status_code = 413
    type = "invalid_request_error"

    def __init__(self, message: str, **kwargs: Any) -> None:
        kwargs.setdefault("code", "file_too_large")
        super().__init__(message, **kwargs)


class RateLimitExceeded(TuneforgeError):
    """OpenAI's 429 `rate_limit_exceeded`. Subclasses say whether retrying can help
    (`x-should-retry`, `Retry-After`)."""

    status_code = 429
    type = "requests"

    def __init__(self, message: str, **kwargs: Any) -> None:
        kwargs.setdefault("code", "rate_limit_exceeded")
        super().__init__(message, **kwargs)


class ServiceUnavailable(TuneforgeError):
    """A dependency (the database, the broker) is down or overloaded for now: the client should
    retry (`x-should-retry: true`)."""

    status_code = 503
    type = "server_error"


DATABASE_UNAVAILABLE = ServiceUnavailable(
    "The service is temporarily unavailable (database); retry the request.", code="service_unavailable"
)

# Pydantic names union members in the loc ('n_epochs', 'constrained-int'), ("...", "literal['auto']"),
# ('target_modules', 'list[str]'), ('x', 'function-after[...]'): none of them is a field a client wrote.
_TAG = re.compile(
    r"^(?:constrained-\w+|literal\[.*\]|function-\w+\[.*\]|"
    r"(?:int|float|str|bool|bytes|none|dict|list|tuple|set|json-or-python|lax-or-strict)(?:\[.*\])?)$"
)


def error_param(loc: Sequence[int | str]) -> str | None:
    """The dotted path a client would name: `("body", "method", "supervised", "hyperparameters",
    "batch_size", "constrained-int")` -> `"method.supervised.hyperparameters.batch_size"`."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header", "form"):
        parts = parts[1:]
    kept: list[str] = []
    for part in parts:
        if isinstance(part, int):
            kept[-1:] = [f"{kept[-1]}[{part}]"] if kept else [f"[{part}]"]
        elif not _TAG.match(part):
            kept.append(part)
    return ".".join(kept) or None


def _message(error: dict[str, Any]) -> str:
    message = str(error.get("msg", "invalid value"))
    return message.removeprefix("Value error, ").removeprefix("Assertion failed, ")


def validation_error_to_bad_request(errors: Sequence[Any]) -> BadRequest:
    """Picks the most telling error: for a union, the member's constraint rather than the
    `"auto"` literal mismatch; names the field by its dotted path."""
    if not errors:
        return BadRequest("Invalid request.")
    ranked = sorted(errors, key=lambda e: (e.get("type") == "literal_error", e.get("type") == "missing"))
    first = ranked[0]
    if first.get("type") == "json_invalid":
        return BadRequest(
            f"The request body is not valid JSON: {first.get('ctx', {}).get('error', 'parse error')}.",
            code="invalid_json",
        )
    param = error_param(first.get("loc", ()))
    siblings = [_message(e) for e in ranked if error_param(e.get("loc", ())) == param]
    detail = siblings[0]
    literals = [
        str(e.get("ctx", {}).get("expected"))
        for e in ranked
        if e.get("type") == "literal_error" and error_param(e.get("loc", ())) == param
    ]
    if len(siblings) > 1 and literals:
        detail = f"{detail}, or {' or '.join(literals)}"
    if first.get("type") == "extra_forbidden":
        message = f"Unrecognized request argument supplied: '{param}'."
    elif first.get("type") == "missing":
        message = f"Missing required parameter: '{param}'."
    elif param:
        message = f"Invalid value for '{param}': {detail}."
    else:
        message = f"Invalid request: {detail}."
    return BadRequest(message, param=param, code="invalid_value" if first.get("type") != "missing" else None)


def _respond(error: TuneforgeError) -> JSONResponse:
    headers = None
    if error.status_code < 500:
        headers = {"x-should-retry": "false"}
    elif error.status_code == 503:
        headers = {"x-should-retry": "true"}
    if error.headers:
        headers = {**(headers or {}), **error.headers}
    return JSONResponse(error.body(), status_code=error.status_code, headers=headers)


async def _tuneforge_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, TuneforgeError)
    return _respond(exc)


async def _request_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError | ValidationError)
    return _respond(validation_error_to_bad_request(list(exc.errors())))


async def _invalid_transition(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, InvalidTransition)
    return _respond(BadRequest(exc.message, code="invalid_job_state"))


async def _http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = 400 if exc.status_code == 422 else exc.status_code
    code = {404: "not_found", 405: "method_not_allowed"}.get(status)
    error = TuneforgeError(str(exc.detail), status_code=status, type="invalid_request_error", code=code)
    return _respond(error)


def is_database_down(exc: BaseException) -> bool:
    """Whether `exc` says the database is unreachable for now (not that a statement is wrong)."""
    if isinstance(exc, DATABASE_UNREACHABLE_ERRORS):
        return True
    return isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated


async def _database_down(request: Request, exc: Exception) -> JSONResponse:
    log.warning(
        "database unavailable on %s %s: %s: %s",
        request.method,
        request.url.path,
        type(exc).__name__,
        str(exc).splitlines()[0] if str(exc) else "",
    )
    return _respond(DATABASE_UNAVAILABLE)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    if is_database_down(exc):
        return await _database_down(request, exc)
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _respond(TuneforgeError("The server had an error while processing your request."))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(TuneforgeError, _tuneforge_error)
    app.add_exception_handler(RequestValidationError, _request_validation_error)
    app.add_exception_handler(ValidationError, _request_validation_error)
    app.add_exception_handler(InvalidTransition, _invalid_transition)
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    for database_error in (*DATABASE_UNREACHABLE_ERRORS, sa_exc.DBAPIError):
        app.add_exception_handler(database_error, _unexpected)
    app.add_exception_handler(Exception, _unexpected)
