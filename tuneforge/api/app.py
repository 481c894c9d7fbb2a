"""The FastAPI application factory: `create_app(settings)`; uvicorn runs it with factory=True."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import version

import anyio.to_thread
from fastapi import FastAPI

from tuneforge.api.auth import KeyCache, resolve_admin_key
from tuneforge.api.errors import install_error_handlers
from tuneforge.api.nul import RejectNul
from tuneforge.api.observability import install_metrics
from tuneforge.api.ratelimit import RateLimiter
from tuneforge.api.responses import ADMIN, AUTHENTICATED, install_openapi
from tuneforge.api.routes import (
    admin,
    chat,
    estimates,
    files,
    graders,
    health,
    jobs,
    models,
    uploads,
    webhooks,
)
from tuneforge.api.services.files import sweeping_incomplete_writes
from tuneforge.config import Settings, get_settings
from tuneforge.db import (
    Reader,
    check_schema,
    make_engine,
    make_read_sessionmaker,
    make_sessionmaker,
    session_slots,
)
from tuneforge.storage import store_from_settings
from tuneforge.ui import install_dashboard

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
        app.state.session_slots = session_slots(engine, settings.api_threads)
        await anyio.to_thread.run_sync(check_schema, engine)  # refuses an unmigrated database
        await reader.open()
        try:
            async with sweeping_incomplete_writes(app.state.store, settings.incomplete_write_max_age_seconds):
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
    app.state.rate_limiter = RateLimiter.from_settings(settings)
    app.state.store = store_from_settings(settings)
    app.state.admin_key = resolve_admin_key(settings)
    install_error_handlers(app)
    app.add_middleware(RejectNul)
    install_metrics(app)  # after the other middlewares: it counts their answers too
    app.include_router(health.router)
    for router in (
        files.router,
        uploads.router,
        jobs.router,
        models.router,
        estimates.router,
        graders.router,
        chat.router,
    ):
        app.include_router(router, responses=AUTHENTICATED)
    app.include_router(webhooks.router, responses=AUTHENTICATED)
    app.include_router(webhooks.event_types_router, responses=AUTHENTICATED)
    app.include_router(admin.router, responses=ADMIN)
    install_dashboard(app)
    install_openapi(app)
    return app
