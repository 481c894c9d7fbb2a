"""Prometheus metrics (`prometheus-client`), every name prefixed `tuneforge_`, no label an id.

Where each is recorded and served:
- API process: HTTP requests by route template and status, with a latency histogram
  (tuneforge/api/observability.py); jobs by status and queue depth by queue, read from the
  database when /metrics is scraped.
- Training workers: job run durations, time from submit to first step, training tokens/s of
  running jobs, lease renewals and heartbeats. They are recorded in the worker's pool processes
  (one per job, short-lived), so a worker with `TUNEFORGE_WORKER_METRICS_PORT` runs
  prometheus-client's multiprocess mode: before its pool starts, the main process points
  `PROMETHEUS_MULTIPROC_DIR` at a fresh directory (`use_multiprocess_directory`), each pool
  process writes its values there, and the main process's /metrics adds them up
  (`serve_worker_metrics`).
- Webhook deliveries by outcome (`record_webhook_delivery`): served by whichever of the two the
  process that delivers is.

A metric picks where its values live (this process's memory, or a file of the multiprocess
directory) when it is created, so `use_multiprocess_directory` creates them all anew: the
import order of this module and the worker's set-up does not matter.

Multiprocess files of dead processes: each pool process writes its own files
(`counter_<pid>.db`, `histogram_<pid>.db`, `gauge_max_<pid>.db`, ...), one set per job run.
The worker's main process folds a dead process's counts into `<kind>_archive.db` files and
deletes its files (`compact_dead_processes`, every `HEARTBEAT_EVERY_S`), so the directory holds
the live processes' files plus one archive set, and the sums served stay what they were.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
HEARTBEAT_EVERY_S = 5.0
ARCHIVE = "archive"


class _Metrics:
    """Every metric, created together with the value class the environment asks for now."""

    def __init__(self) -> None:
        values.ValueClass = values.get_value_class()
        # --- API ---
        self.http_requests = Counter(
            "tuneforge_http_requests",
            "HTTP requests answered, by method, route template (never a path with ids) and status.",
            ["method", "route", "status"],
        )
        self.http_latency = Histogram(
            "tuneforge_http_request_duration_seconds",
            "Time to answer an HTTP request (to the end of its body), by method and route template.",
            ["method", "route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
        )
        # --- webhooks (recorded by the sender, tuneforge/worker/webhooks.py) ---
        self.webhook_deliveries = Counter(
            "tuneforge_webhook_deliveries",
            "Webhook delivery attempts by outcome (e.g. delivered, failed, gave_up).",
            ["outcome"],
        )
        # --- workers ---
        self.job_run_seconds = Histogram(
            "tuneforge_job_run_duration_seconds",
            "Wall time of one run of a job on a worker, from its claim to its outcome (succeeded, "
            "failed, cancelled, paused, handed-back, lease-lost).",
            ["outcome"],
            buckets=(10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400, 259200),
        )
        self.time_to_first_step = Histogram(
            "tuneforge_job_time_to_first_step_seconds",
            "Time from a job's creation (submit) to its first trained step: validation, queueing, "
            "model load.",
            buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 14400, 86400),
        )
        self.training_tokens_per_second = Gauge(
            "tuneforge_training_tokens_per_second",
            "Training throughput (real, non-padding tokens per second) of the jobs running now, by queue.",
            ["queue"],
            multiprocess_mode="livesum",
        )
        self.training_tokens = Counter(
            "tuneforge_training_tokens", "Real (non-padding) tokens trained, by queue.", ["queue"]
        )
        self.training_steps = Counter(
            "tuneforge_training_steps", "Optimizer steps trained, by queue.", ["queue"]
        )
        self.lease_renewals = Counter(
            "tuneforge_worker_lease_renewals",
            "Leases of running jobs renewed in the database (a running job's heartbeat), by result.",
            ["result"],
        )
        self.worker_heartbeat = Gauge(
            "tuneforge_worker_heartbeat_timestamp_seconds",
            "Unix time of the worker's latest heartbeat: its main process every few seconds, and each "
            "renewal of a running job's lease.",
            multiprocess_mode="max",
        )

    def unregister(self) -> None:
        for metric in vars(self).values():
            REGISTRY.unregister(metric)


_metrics = _Metrics()


def use_multiprocess_directory(directory: Path) -> None:
    """Puts this process, and the processes it forks afterwards, in multiprocess mode: their values
    go to files in `directory` (which must exist), added up by `exposition` and the worker's
    endpoint. The metrics are created anew; values recorded before stay uncounted."""
    global _metrics
    os.environ[MULTIPROC_ENV] = str(directory)
    _metrics.unregister()
    _metrics = _Metrics()


def record_webhook_delivery(outcome: str) -> None:
    """One webhook delivery attempt ended with `outcome` (a short fixed word, never an id)."""
    _metrics.webhook_deliveries.labels(outcome=outcome).inc()


def record_http_request(method: str, route: str, status: int, seconds: float) -> None:
    _metrics.http_requests.labels(method=method, route=route, status=str(status)).inc()
    _metrics.http_latency.labels(method=method, route=route).observe(seconds)


def record_heartbeat() -> None:
    _metrics.worker_heartbeat.set(time.time())


def record_lease_renewal(ok: bool) -> None:
    _metrics.lease_renewals.labels(result="ok" if ok else "failed").inc()
    if ok:
        record_heartbeat()


def record_training_step(queue: str, steps: int, tokens: int, tokens_per_second: float | None) -> None:
    """A running job reported `steps` more optimizer steps and `tokens` more trained tokens."""
    if steps > 0:
        _metrics.training_steps.labels(queue=queue).inc(steps)
    if tokens > 0:
        _metrics.training_tokens.labels(queue=queue).inc(tokens)
    if tokens_per_second is not None:
        _metrics.training_tokens_per_second.labels(queue=queue).set(tokens_per_second)


def record_first_step(seconds: float) -> None:
    _metrics.time_to_first_step.observe(max(0.0, seconds))


def record_run_finished(queue: str, outcome: str, seconds: float) -> None:
    """A run of a job ended: its queue has one job less training, and its duration by outcome.
    In that order: a scrape that sees the run counted also sees its throughput gone."""
    _metrics.training_tokens_per_second.labels(queue=queue).set(0)
    _metrics.job_run_seconds.labels(outcome=outcome).observe(max(0.0, seconds))


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


# --- multiprocess files of dead processes ------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pid_and_kind(path: Path) -> tuple[int, str] | None:
    """`counter_123.db` -> (123, "counter"), `gauge_max_123.db` -> (123, "gauge_max"); None for an
    archive or a name of another shape."""
    kind, _, pid = path.stem.rpartition("_")
    return (int(pid), kind) if pid.isdigit() and kind else None


def compact_dead_processes(directory: Path) -> int:
    """Folds the files of processes that no longer run into the directory's archive files and
    deletes them; returns how many files went. Counters, histograms and summaries add up; `max`
    and `min` gauges keep the extreme; `live*` gauges of a dead process are dropped (what
    prometheus-client's mark_process_dead does); any other gauge's files stay. Call it from one
    process only (the worker's main process), and not while a scrape reads the directory."""
    from prometheus_client.mmap_dict import MmapedDict

    merge = {"counter": "add", "histogram": "add", "summary": "add", "gauge_sum": "add"}
    merge |= {"gauge_max": "max", "gauge_min": "min"}
    removed = 0
    for path in sorted(directory.glob("*.db")):
        parsed = _pid_and_kind(path)
        if parsed is None or _alive(parsed[0]):
            continue
        kind = parsed[1]
        how = merge.get(kind)
        if how is None and not kind.startswith("gauge_live"):
            continue
        if how is not None:
            archive = MmapedDict(str(directory / f"{kind}_{ARCHIVE}.db"))
            try:
                archived = {key for key, _, _ in archive.read_all_values()}
                for key, value, timestamp, _ in MmapedDict.read_all_values_from_file(str(path)):
                    old = archive.read_value(key)[0]
                    if key not in archived:
                        new = value
                    elif how == "add":
                        new = old + value
                    else:
                        new = max(old, value) if how == "max" else min(old, value)
                    archive.write_value(key, new, timestamp)
            finally:
                archive.close()
        path.unlink()
        removed += 1
    return removed


class _DirectoryCollector(Collector):
    """prometheus-client's MultiProcessCollector, never reading while the directory is compacted."""

    def __init__(self, directory: Path, lock: threading.Lock) -> None:
        from prometheus_client.multiprocess import MultiProcessCollector

        self._collector = MultiProcessCollector(None, path=str(directory))
        self._lock = lock

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            return list(self._collector.collect())


# --- the worker's endpoint ---------------------------------------------------------------------


def serve_worker_metrics(host: str, port: int, directory: Path) -> int | None:
    """GET /metrics (any path answers) on host:port (0: a free port) from a daemon thread of the
    worker's main process: the sum of the values in `directory` (its pool processes' and its own
    heartbeat), which a second thread beats and compacts every HEARTBEAT_EVERY_S. Returns the
    port it listens on; None, having logged why, when it cannot listen (the worker runs on)."""
    from prometheus_client import start_http_server

    lock = threading.Lock()
    registry = CollectorRegistry()
    registry.register(_DirectoryCollector(directory, lock))
    try:
        server, _ = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        log.error(
            "worker metrics: cannot listen on %s:%s (%s); this worker runs without /metrics "
            "(set TUNEFORGE_WORKER_METRICS_PORT or TUNEFORGE_BEAT_METRICS_PORT to a free port)",
            host,
            port,
            exc,
        )
        return None
    bound = int(server.server_address[1])

    def beat() -> None:
        while True:
            record_heartbeat()
            try:
                with lock:
                    compact_dead_processes(directory)
            except Exception:
                log.exception("worker metrics: compacting %s failed", directory)
            time.sleep(HEARTBEAT_EVERY_S)

    threading.Thread(target=beat, name="tuneforge-metrics-heartbeat", daemon=True).start()
    log.info("worker metrics on http://%s:%s/metrics", host, bound)
    return bound


def mark_process_dead(pid: int) -> None:
    """A pool process exits: its live gauges (tokens/s) stop counting."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
