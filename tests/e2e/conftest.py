"""End-to-end stacks driven with the official `openai` SDK:

- `embedded`: what `make run` starts: `tuneforge migrate` + `tuneforge serve` with no broker
  configured (SQLite, filesystem store, embedded SQLite broker, embedded worker + beat).
- `distributed`: PostgreSQL, Redis, moto's S3 server, `tuneforge serve` and separate
  `tuneforge worker` and `tuneforge beat` processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.worker.conftest import pg_url, redis_url  # noqa: F401  (fixtures shared with tests/worker)
from tests.worker.procs import REPO, free_port, kill_tree


@dataclass
class Stack:
    base_url: str
    key: str
    env: dict[str, str]
    tmp: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def sdk(self) -> OpenAI:
        return OpenAI(base_url=self.base_url + "/v1", api_key=self.key, max_retries=2, timeout=60)

    def http(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.base_url, headers={"Authorization": f"Bearer {self.key}"}, timeout=60
        )

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        with (self.tmp / f"{name}.log").open("ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "tuneforge.cli", *args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=REPO,
                start_new_session=True,
            )
        self.processes[name] = process
        return process

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        process = self.processes.pop(name)
        kill_tree(process.pid, sig) if sig == signal.SIGKILL else process.send_signal(sig)
        try:
            process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            kill_tree(process.pid, signal.SIGKILL)
            process.wait()
        kill_tree(process.pid, signal.SIGKILL)  # anything of its group still alive

    def stop_all(self) -> None:
        for name in list(self.processes):
            self.stop(name)

    def logs(self) -> str:
        return "\n".join(
            f"== {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.tmp.rglob("*.log"))
        )

    def wait_healthy(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            server = self.processes["serve"]
            if server.poll() is not None:
                raise RuntimeError(f"tuneforge serve exited with {server.returncode}\n{self.logs()}")
            try:
                if httpx.get(self.base_url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"tuneforge serve did not answer\n{self.logs()}")


def _base_env(tmp: Path, models_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEFORGE_")}
    env.update(
        {
            "TUNEFORGE_DATA_DIR": str(tmp / "data"),
            "TUNEFORGE_MODELS_DIR": str(models_dir),
            "PYTHONPATH": str(REPO),
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    return env


@pytest.fixture(scope="module")
def embedded(
    tmp_path_factory: pytest.TempPathFactory, tiny_chat_path: Path, models_dir: Path
) -> Iterator[Stack]:
    """`make run`: migrate, then serve with every embedded default (the embedded worker included)."""
    tmp = tmp_path_factory.mktemp("embedded")
    port = free_port()
    stack = Stack(f"http://127.0.0.1:{port}", "", _base_env(tmp, models_dir), tmp)
    subprocess.run([sys.executable, "-m", "tuneforge.cli", "migrate"], env=stack.env, check=True, cwd=REPO)
    stack.start("serve", "serve", "--port", str(port))
    try:
        stack.wait_healthy()
        stack.key = (tmp / "data" / "admin_key").read_text().strip()
        yield stack
    finally:
        stack.stop_all()


@pytest.fixture(scope="module")
def distributed(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_chat_path: Path,
    models_dir: Path,
    pg_url: str,  # noqa: F811
    redis_url: str,  # noqa: F811
    s3_endpoint: str,
) -> Iterator[Stack]:
    """serve + separate worker and beat on PostgreSQL, Redis and S3 (moto)."""
    from tuneforge.storage.s3 import S3Store

    tmp = tmp_path_factory.mktemp("distributed")
    bucket = f"tf-e2e-{uuid.uuid4().hex[:8]}"
    S3Store(bucket, endpoint_url=s3_endpoint, create_bucket=True)
    port = free_port()
    env = _base_env(tmp, models_dir)
    env.update(
        {
            "TUNEFORGE_DATABASE_URL": pg_url,
            "TUNEFORGE_BROKER_URL": redis_url,
            "TUNEFORGE_STORAGE_URL": f"s3://{bucket}/objects",
            "TUNEFORGE_S3_ENDPOINT_URL": s3_endpoint,
            "TUNEFORGE_ADMIN_KEY": "tf-admin-" + uuid.uuid4().hex,
            "TUNEFORGE_LEASE_SECONDS": "6",
            "TUNEFORGE_RECONCILE_EVERY_SECONDS": "2",
            "TUNEFORGE_QUEUED_STALE_SECONDS": "30",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    )
    stack = Stack(f"http://127.0.0.1:{port}", env["TUNEFORGE_ADMIN_KEY"], env, tmp)
    stack.start("serve", "serve", "--port", str(port))
    stack.start("worker", "worker", "--queues", "gpu", "--concurrency", "1")
    stack.start("beat", "beat")
    try:
        stack.wait_healthy()
        yield stack
    finally:
        stack.stop_all()
