"""The web dashboard at /ui: static files (an HTML shell, one ES module, CSS and the vendored uPlot
chart library) that call the JSON API in the browser with the signed-in key.

No templates and no build step: the server only hands out files, so every value a user typed
reaches the page through the API as JSON and is put into the DOM as text by app.js. The answers
under /ui carry a Content-Security-Policy that allows scripts and styles from this origin only.
"""

from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.responses import FileResponse, RedirectResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

STATIC = Path(__file__).parent / "static"

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "connect-src 'self'",
        "font-src 'self'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
SECURITY_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cache-control": "no-cache",
}


class SecurityHeaders:
    """Adds `SECURITY_HEADERS` to every answer of the app it wraps (the dashboard only)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def _index(request: object) -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")


def dashboard() -> ASGIApp:
    """The /ui application: `/ui/` is the page, `/ui/static/...` its files."""
    app = Starlette(
        routes=[
            Route("/", _index),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ]
    )
    return SecurityHeaders(app)


async def _to_dashboard(request: object) -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=307)


def install_dashboard(app: Starlette) -> None:
    """Mounts the dashboard at /ui (outside the OpenAPI document: it is no API)."""
    app.router.routes.append(Route("/ui", _to_dashboard, include_in_schema=False))
    app.mount("/ui", dashboard(), name="ui")
