"""Prometheus metrics (`prometheus-client`), every name prefixed `tuneforge_`, no label an id.

Where each is recorded and served:
- API process: HTTP requests by route template and status, with a latency histogram
  (tuneforge/api/metrics.py); jobs by status and queue depth by queue, read from the database
  when /metrics is scraped.
- Training workers: job run durations, time from submit to first step, training tokens/s of
  running jobs, lease renewals and heartbeats. They are recorded in the worker's pool processes
  (one per job, short-lived), so a worker with `TUNEFORGE_WORKER_METRICS_PORT` runs
  prometheus-client's multiprocess mode: the main process points `PROMETHEUS_MULTIPROC_DIR` at a
  fresh directory before its pool starts, each pool process writes its values there, and the
  main process's /metrics adds them up (`serve_worker_metrics`).
- Webhook deliveries by outcome (`record_webhook_delivery`): served by whichever of the two the
  process that delivers is.

The metrics are module globals, created at import. In multiprocess mode the value class must be
chosen after the environment variable is set, so a worker imports this module only after its
set-up (tuneforge/worker/celery_app.py) and records through tuneforge/worker/observability.py,
which imports it lazily.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    values,
)

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
HEARTBEAT_EVERY_S = 5.0

# The environment decides between one process's values and multiprocess files; read it now, not
# when prometheus_client was first imported (possibly before the worker set it).
values.ValueClass = values.get_value_class()

# --- API ---------------------------------------------------------------------------------------
HTTP_REQUESTS = Counter(
    "tuneforge_http_requests",
    "HTTP requests answered, by method, route template (never a path with ids) and status.",
    ["method", "route", "status"],
)
HTTP_LATENCY = Histogram(
    "tuneforge_http_request_duration_seconds",
    "Time to answer an HTTP request (to the end of its body), by method and route template.",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)

# --- webhooks (recorded by the sender, tuneforge's webhook delivery code) ----------------------
WEBHOOK_DELIVERIES = Counter(
    "tuneforge_webhook_deliveries",
    "Webhook delivery attempts by outcome (e.g. delivered, failed, gave_up).",
    ["outcome"],
)

# --- workers -----------------------------------------------------------------------------------
JOB_RUN_SECONDS = Histogram(
    "tuneforge_job_run_duration_seconds",
    "Wall time of one run of a job on a worker, from its claim to its outcome (succeeded, failed, "
    "cancelled, paused, handed-back, lease-lost).",
    ["outcome"],
    buckets=(10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400, 259200),
)
TIME_TO_FIRST_STEP = Histogram(
    "tuneforge_job_time_to_first_step_seconds",
    "Time from a job's creation (submit) to its first trained step: validation, queueing, model load.",
    buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 14400, 86400),
)
TRAINING_TOKENS_PER_SECOND = Gauge(
    "tuneforge_training_tokens_per_second",
    "Training throughput (real, non-padding tokens per second) of the jobs running now, by queue.",
    ["queue"],
    multiprocess_mode="livesum",
)
TRAINING_TOKENS = Counter(
    "tuneforge_training_tokens",
    "Real (non-padding) tokens trained, by queue.",
    ["queue"],
)
TRAINING_STEPS = Counter("tuneforge_training_steps", "Optimizer steps trained, by queue.", ["queue"])
LEASE_RENEWALS = Counter(
    "tuneforge_worker_lease_renewals",
    "Leases of running jobs renewed in the database (a running job's heartbeat), by result.",
    ["result"],
)
WORKER_HEARTBEAT = Gauge(
    "tuneforge_worker_heartbeat_timestamp_seconds",
    "Unix time of the worker's latest heartbeat: its main process every few seconds, and each "
    "renewal of a running job's lease.",
    multiprocess_mode="max",
)


def record_webhook_delivery(outcome: str) -> None:
    """One webhook delivery attempt ended with `outcome` (a short fixed word, never an id)."""
    WEBHOOK_DELIVERIES.labels(outcome=outcome).inc()


def record_http_request(method: str, route: str, status: int, seconds: float) -> None:
    HTTP_REQUESTS.labels(method=method, route=route, status=str(status)).inc()
    HTTP_LATENCY.labels(method=method, route=route).observe(seconds)


def record_heartbeat() -> None:
    WORKER_HEARTBEAT.set(time.time())


def record_lease_renewal(ok: bool) -> None:
    LEASE_RENEWALS.labels(result="ok" if ok else "failed").inc()
    if ok:
        record_heartbeat()


def record_training_step(queue: str, steps: int, tokens: int, tokens_per_second: float | None) -> None:
    """A running job reported `steps` more optimizer steps and `tokens` more trained tokens."""
    if steps > 0:
        TRAINING_STEPS.labels(queue=queue).inc(steps)
    if tokens > 0:
        TRAINING_TOKENS.labels(queue=queue).inc(tokens)
    if tokens_per_second is not None:
        TRAINING_TOKENS_PER_SECOND.labels(queue=queue).set(tokens_per_second)


def record_first_step(seconds: float) -> None:
    TIME_TO_FIRST_STEP.observe(max(0.0, seconds))


def record_run_finished(queue: str, outcome: str, seconds: float) -> None:
    """A run of a job ended: its duration by outcome; its queue has one job less training."""
    JOB_RUN_SECONDS.labels(outcome=outcome).observe(max(0.0, seconds))
    TRAINING_TOKENS_PER_SECOND.labels(queue=queue).set(0)


def exposition(*extra: CollectorRegistry) -> bytes:
    """This process's metrics in the text format, plus `extra` registries' (the API's database
    gauges). In multiprocess mode: every process's values in the directory."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        parts = [generate_latest(registry)]
    else:
        parts = [generate_latest(REGISTRY)]
    parts += [generate_latest(r) for r in extra]
    return b"".join(parts)


# --- the worker's endpoint ---------------------------------------------------------------------


def serve_worker_metrics(host: str, port: int) -> None:
    """GET /metrics (any path answers) on host:port from a daemon thread of the worker's main
    process: the sum of its pool processes' values, plus the main process's heartbeat."""
    from prometheus_client import start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    start_http_server(port, addr=host, registry=registry)

    def beat() -> None:
        while True:
            record_heartbeat()
            time.sleep(HEARTBEAT_EVERY_S)

    threading.Thread(target=beat, name="tuneforge-metrics-heartbeat", daemon=True).start()
    log.info("worker metrics on http://%s:%s/metrics", host, port)


def mark_process_dead(pid: int) -> None:
    """A pool process exits: its live gauges (tokens/s) stop counting."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
