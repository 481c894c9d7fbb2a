"""Liveness and readiness probes (no authentication).

`/readyz` answers only `ok` or `unavailable` for each check: the reasons stay in the server's
log, never in an answer anyone can read without a key.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from sqlalchemy import Engine

from tuneforge.config import Settings
from tuneforge.db import check_schema
from tuneforge.storage import ObjectStore

log = logging.getLogger(__name__)

router = APIRouter(tags=["health"])

_OK = b'{"status":"ok"}'
BROKER_TIMEOUT_SECONDS = 2.0

CheckState = Literal["ok", "unavailable"]


class Health(BaseModel):
    status: Literal["ok"]


class ReadinessChecks(BaseModel):
    database: CheckState = Field(description="The database answers.")
    schema_: CheckState = Field(
        alias="schema", description="The database's schema is the migrations' head revision."
    )
    store: CheckState = Field(description="The object store answers.")
    broker: CheckState = Field(description="The job broker answers.")


class Readiness(BaseModel):
    status: CheckState
    checks: ReadinessChecks


@router.get(
    "/healthz",
    summary="Liveness: answers a constant",
    responses={200: {"model": Health, "description": "The process is up."}},
)
async def healthz() -> Response:
    return Response(_OK, media_type="application/json")


def _broker_answers(url: str) -> None:
    from kombu import Connection

    with Connection(url, connect_timeout=BROKER_TIMEOUT_SECONDS) as connection:
        connection.ensure_connection(max_retries=1, timeout=BROKER_TIMEOUT_SECONDS)


def _run_check(name: str, probe: Callable[[], object]) -> CheckState:
    try:
        probe()
    except Exception as exc:
        log.warning("readiness check %s failed: %s: %s", name, type(exc).__name__, exc)
        return "unavailable"
    return "ok"


def _checks(engine: Engine, store: ObjectStore, settings: Settings) -> dict[str, CheckState]:
    database = _run_check("database", lambda: engine.connect().close())
    return {
        "database": database,
        "schema": _run_check("schema", lambda: check_schema(engine)) if database == "ok" else "unavailable",
        "store": _run_check("store", store.check),
        "broker": _run_check("broker", lambda: _broker_answers(settings.celery_broker_url)),
    }


@router.get(
    "/readyz",
    summary="Readiness: the database (at the expected schema), the object store and the broker answer",
    responses={
        200: {"model": Readiness, "description": "Every check answered."},
        503: {"model": Readiness, "description": "At least one check did not answer."},
    },
)
async def readyz(request: Request) -> JSONResponse:
    state = request.app.state
    checks = await run_in_threadpool(_checks, state.engine, state.store, state.settings)
    ready = all(value == "ok" for value in checks.values())
    body = {"status": "ok" if ready else "unavailable", "checks": checks}
    return JSONResponse(body, status_code=200 if ready else 503)
