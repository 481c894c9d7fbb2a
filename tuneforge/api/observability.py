"""The API's Prometheus metrics: every HTTP request by route template and status (an ASGI
middleware), and the database's job gauges read when /metrics is scraped. The metrics
themselves are defined in tuneforge/metrics.py."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tuneforge.db import session_scope
from tuneforge.metrics import record_http_request
from tuneforge.models.job import WAITING_STATUSES, Job, JobStatus

log = logging.getLogger(__name__)

UNMATCHED = "unmatched"


class HttpMetrics:
    """Counts and times every HTTP request, labelled by the route's path template
    (`/v1/fine_tuning/jobs/{job_id}`), never by the path itself: ids would make a series each.
    A path no route matches is `unmatched`; an exception that escapes the app counts as a 500."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or UNMATCHED
            record_http_request(scope["method"], route, status, time.perf_counter() - started)


def jobs_by_status(session: Session) -> dict[str, int]:
    rows = session.execute(select(Job.status, func.count()).group_by(Job.status))
    return {str(status): int(count) for status, count in rows}


def waiting_jobs_by_queue(session: Session) -> dict[str, int]:
    """Jobs waiting for a worker (validating_files or queued), by broker queue."""
    rows = session.execute(
        select(Job.queue, func.count()).where(Job.status.in_(list(WAITING_STATUSES))).group_by(Job.queue)
    )
    return {str(queue): int(count) for queue, count in rows}


class JobsCollector(Collector):
    """`tuneforge_jobs{status}` and `tuneforge_queue_depth{queue}`, from the database at each
    scrape (two grouped counts). While the database is unreachable they are left out."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            with session_scope(self.sessions) as session:
                statuses = jobs_by_status(session)
                depths = waiting_jobs_by_queue(session)
        except Exception:
            log.warning("metrics: the job counts could not be read", exc_info=True)
            return
        jobs = GaugeMetricFamily("tuneforge_jobs", "Jobs by status (all projects).", labels=["status"])
        for known in JobStatus:
            jobs.add_metric([known.value], statuses.pop(known.value, 0))
        for status, count in statuses.items():
            jobs.add_metric([status], count)
        yield jobs
        queue = GaugeMetricFamily(
            "tuneforge_queue_depth",
            "Jobs waiting for a worker (validating_files or queued), by queue.",
            labels=["queue"],
        )
        for name, count in sorted(depths.items()):
            queue.add_metric([name], count)
        yield queue


def install_metrics(app: FastAPI) -> None:
    """The request metrics middleware (outermost of those added so far), the database gauges'
    registry (one per app) and GET /metrics."""
    from tuneforge.api.routes import metrics

    app.add_middleware(HttpMetrics)
    app.state.metrics_registry = CollectorRegistry()
    app.state.metrics_registry.register(JobsCollector(app.state.sessionmaker))
    app.include_router(metrics.router)
