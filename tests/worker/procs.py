"""Process and service helpers shared by the worker and end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from tuneforge.config import Settings

REPO = Path(__file__).resolve().parents[2]
PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
STANDIN = "tests.worker.standin:standin_training"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def migrate(url: str) -> None:
    from alembic import command
    from alembic.config import Config

    config = Config(str(REPO / "alembic.ini"))
    config.attributes["url"] = url
    command.upgrade(config, "head")


@dataclass
class Services:
    """Settings and handles shared by the processes of one test module."""

    env: dict[str, str]
    tmp: Path
    engine: Engine
    sessions: sessionmaker[Session]
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def settings(self) -> Settings:
        saved = dict(os.environ)
        os.environ.update(self.env)
        try:
            return Settings()
        finally:
            os.environ.clear()
            os.environ.update(saved)

    def start(
        self, *args: str, name: str = "worker", extra_env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = (self.tmp / f"{name}-{len(self.processes)}.log").open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "tuneforge.cli", *args],
            env={**os.environ, **self.env, **(extra_env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=REPO,
            start_new_session=True,
        )
        self.processes.append(process)
        return process

    def worker(self, queues: str = "gpu", concurrency: int = 1, **kw: Any) -> subprocess.Popen[bytes]:
        return self.start("worker", "--queues", queues, "--concurrency", str(concurrency), **kw)

    def beat(self) -> subprocess.Popen[bytes]:
        return self.start("beat", name="beat")

    def stop(self, process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
        kill_tree(process.pid, sig)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            kill_tree(process.pid, signal.SIGKILL)
            process.wait()

    def stop_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                self.stop(process)
        for process in self.processes:
            kill_tree(process.pid, signal.SIGKILL)
        self.processes.clear()

    def logs(self) -> str:
        return "\n".join(
            f"== {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in sorted(self.tmp.glob("*.log"))
        )


def kill_tree(pid: int, sig: int) -> None:
    """Signals a process and every descendant (workers start pool processes and training processes)."""
    try:
        root = psutil.Process(pid)
        family = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for proc in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(sig)


def training_processes() -> list[psutil.Process]:
    """Every live `tuneforge.worker.child` process on the machine started from this checkout."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if "tuneforge.worker.child" in cmd:
            found.append(proc)
    return found


def wait_for(
    predicate: Callable[[], Any], timeout: float, what: str, services: Services | None = None
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(
        f"timed out after {timeout}s waiting for {what}" + (f"\n{services.logs()}" if services else "")
    )
