"""The worker tests' processes: `tuneforge worker` / `tuneforge beat` started with one module's
settings. The generic helpers (ports, waiting, process trees) are in tests.support."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from tests.support import REPO, free_port, kill_tree, migrate, stop_process, wait_for
from tuneforge.config import Settings
from tuneforge.db import make_engine, make_sessionmaker
from tuneforge.worker.forkserver import PROCESS_NAME, RANK_NAME_PREFIX

__all__ = [
    "REPO",
    "STANDIN",
    "Services",
    "free_port",
    "migrate",
    "running_services",
    "training_processes",
    "wait_for",
]

STANDIN = "tests.worker.standin:standin_training"


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
        stop_process(process, sig, timeout=30)

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


def training_processes() -> list[psutil.Process]:
    """Every live training process on the machine: `tuneforge.worker.child` interpreters, the
    fork server's children, named `tuneforge-run` or for a rank `tf-rank-N` (their command line is
    the server's), and the ranks' stand-ins (`tuneforge.worker.rankproxy`)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "name"]):
        cmd = proc.info.get("cmdline") or []
        name = proc.info.get("name") or ""
        if (
            "tuneforge.worker.child" in cmd
            or "tuneforge.worker.rankproxy" in cmd
            or name == PROCESS_NAME.decode()
            or name.startswith(RANK_NAME_PREFIX)
        ):
            found.append(proc)
    return found


@contextmanager
def running_services(
    tmp: Path, database_url: str, broker_url: str, models_dir: Path, env: dict[str, str] | None = None
) -> Iterator[Services]:
    """Services for one test module: the settings every worker test shares (its database and
    broker, a filesystem store and data directory under `tmp`, the stand-in training runner)
    plus `env`; every process started through it is stopped on exit."""
    settings = {
        "TUNEFORGE_DATA_DIR": str(tmp / "data"),
        "TUNEFORGE_DATABASE_URL": database_url,
        "TUNEFORGE_BROKER_URL": broker_url,
        "TUNEFORGE_STORAGE_URL": f"file://{tmp / 'objects'}",
        "TUNEFORGE_MODELS_DIR": str(models_dir),
        "TUNEFORGE_TRAINING_RUNNER": STANDIN,
        "PYTHONPATH": str(REPO),
        **(env or {}),
    }
    engine = make_engine(database_url, pool_size=2, max_overflow=2)
    services = Services(settings, tmp, engine, make_sessionmaker(engine))
    try:
        yield services
    finally:
        services.stop_all()
        engine.dispose()
