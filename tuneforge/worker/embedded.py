"""Worker processes started by `tuneforge serve` when no broker is configured: a real Celery
worker and the reconciler's beat, as child processes of the server, on the same code path as
production (`tuneforge worker`, `tuneforge beat`), stopped with the server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tuneforge.config import Settings


@dataclass
class EmbeddedWorker:
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    stop_timeout: float = 20.0

    def stop(self, timeout: float | None = None) -> None:
        """Warm shutdown (SIGTERM: a running job checkpoints and goes back to its queue), then
        SIGKILL after `timeout` (default `stop_timeout`)."""
        timeout = self.stop_timeout if timeout is None else timeout
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM when the server dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def start_embedded_worker(settings: Settings, log_dir: Path | None = None) -> EmbeddedWorker:
    """Starts `tuneforge worker --concurrency 1` and `tuneforge beat` with this process's settings,
    and `tuneforge inference` on the embedded socket unless an inference server is configured."""
    log_dir = log_dir or settings.data_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TUNEFORGE_DATA_DIR": str(settings.data_dir)}
    worker = EmbeddedWorker(stop_timeout=settings.worker_shutdown_grace_seconds + 10)
    children = [
        ("worker", ["worker", "--queues", settings.default_queue, "--concurrency", "1"]),
        ("beat", ["beat"]),
    ]
    if not settings.inference_engine_url and not settings.inference_url:
        children.append(("inference", ["inference", "--uds", str(settings.inference_socket)]))
    for name, args in children:
        with (log_dir / f"{name}.log").open("ab") as log:
            worker.processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "tuneforge.cli", *args],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    preexec_fn=_die_with_parent,
                )
            )
    return worker
