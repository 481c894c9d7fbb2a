"""Liveness and readiness probes (no authentication)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from sqlalchemy import Engine, text

from tuneforge.storage import ObjectStore

router = APIRouter(tags=["health"])

_OK = b'{"status":"ok"}'


@router.get("/healthz", summary="Liveness: answers a constant")
async def healthz() -> Response:
    return Response(_OK, media_type="application/json")


def _check(engine: Engine, store: ObjectStore) -> dict[str, str]:
    checks: dict[str, str] = {}
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"error: {type(exc).__name__}: {exc}"[:500]
    try:
        store.check()
        checks["store"] = "ok"
    except Exception as exc:
        checks["store"] = f"error: {type(exc).__name__}: {exc}"[:500]
    return checks


@router.get("/readyz", summary="Readiness: the database and the object store answer")
async def readyz(request: Request) -> JSONResponse:
    checks = await run_in_threadpool(_check, request.app.state.engine, request.app.state.store)
    ready = all(value == "ok" for value in checks.values())
    body: dict[str, Any] = {"status": "ok" if ready else "unavailable", "checks": checks}
    return JSONResponse(body, status_code=200 if ready else 503)
