"""The FastAPI application factory: `create_app(settings)`; uvicorn runs it with factory=True."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import version

import anyio.to_thread
from fastapi import FastAPI

from tuneforge.api.auth import KeyCache, resolve_admin_key
from tuneforge.api.errors import install_error_handlers
from tuneforge.api.routes import admin, estimates, files, health, jobs, models
from tuneforge.config import Settings, get_settings
from tuneforge.db import Reader, make_engine, make_read_sessionmaker, make_sessionmaker
from tuneforge.storage import open_store

DESCRIPTION = (
    "OpenAI-compatible fine-tuning API. Authenticate with `Authorization: Bearer <key>`: the admin "
    "key or a project key from /v1/admin/projects/{id}/api_keys."
)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    engine = make_engine(settings.database_url)
    reader = Reader(engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.api_threads
        await reader.open()
        try:
            yield
        finally:
            await reader.close()
            engine.dispose()

    app = FastAPI(
        title="Tuneforge",
        version=version("tuneforge"),
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url="/docs",
        openapi_url="/openapi.json",
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessionmaker = make_sessionmaker(engine)
    app.state.read_sessionmaker = make_read_sessionmaker(engine)
    app.state.reader = reader
    app.state.key_cache = KeyCache(settings.api_key_cache_seconds)
    app.state.store = open_store(settings.storage_url, settings.s3_endpoint_url)
    app.state.admin_key = resolve_admin_key(settings)
    install_error_handlers(app)
    for router in (health.router, files.router, jobs.router, models.router, admin.router, estimates.router):
        app.include_router(router)
    return app
