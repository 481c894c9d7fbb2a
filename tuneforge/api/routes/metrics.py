"""GET /metrics: Prometheus' text format, no key (like any exporter: keep it off public networks)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from tuneforge.metrics import CONTENT_TYPE, exposition

router = APIRouter(tags=["health"])


@router.get(
    "/metrics",
    summary="Prometheus metrics (no key)",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text exposition format: HTTP requests, jobs by status, "
            "queue depth by queue, webhook deliveries.",
            "content": {CONTENT_TYPE: {"schema": {"type": "string"}}},
        }
    },
)
def metrics(request: Request) -> Response:
    return Response(exposition(request.app.state.metrics_registry), media_type=CONTENT_TYPE)
