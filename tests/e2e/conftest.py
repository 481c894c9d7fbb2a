"""End-to-end stacks driven with the official `openai` SDK:

- `embedded`: what `make run` starts: `tuneforge migrate` + `tuneforge serve` with no broker
  configured (SQLite, filesystem store, embedded SQLite broker, embedded worker + beat).
- `distributed`: PostgreSQL, Redis, moto's S3 server, `tuneforge serve` and separate
  `tuneforge worker` and `tuneforge beat` processes.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.support import REPO, free_port, stop_process, tuneforge_env
from tests.support.server import wait_healthy


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
        """`sig` to the process (SIGKILL: to its whole tree), then SIGKILL to whatever is left."""
        process = self.processes.pop(name)
        stop_process(process, sig, timeout=40, tree=sig == signal.SIGKILL)

    def stop_all(self) -> None:
        for name in list(self.processes):
            self.stop(name)

    def logs(self) -> str:
        return "\n".join(
            f"== {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.tmp.rglob("*.log"))
        )

    def wait_healthy(self, timeout: float = 90) -> None:
        try:
            wait_healthy(self.base_url, self.processes["serve"], timeout, self.tmp / "serve.log")
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n{self.logs()}") from None


def _base_env(tmp: Path, models_dir: Path) -> dict[str, str]:
    return tuneforge_env(
        {
            "TUNEFORGE_DATA_DIR": str(tmp / "data"),
            "TUNEFORGE_MODELS_DIR": str(models_dir),
            "PYTHONPATH": str(REPO),
        }
    )


@pytest.fixture(scope="module")
def embedded(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    tiny_chat_path: Path,
    models_dir: Path,
) -> Iterator[Stack]:
    """`make run`: migrate, then serve with every embedded default (the embedded worker included),
    but for the settings in the test module's `EMBEDDED_ENV` (a dict of variables), if it has one."""
    tmp = tmp_path_factory.mktemp("embedded")
    port = free_port()
    env = {**_base_env(tmp, models_dir), **getattr(request.module, "EMBEDDED_ENV", {})}
    stack = Stack(f"http://127.0.0.1:{port}", "", env, tmp)
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
    pg_url: str,
    redis_url: str,
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
            "TUNEFORGE_S3_PUBLIC_ENDPOINT_URL": s3_endpoint,
            "TUNEFORGE_ADMIN_KEY": "tf-admin-" + uuid.uuid4().hex,
            "TUNEFORGE_LEASE_SECONDS": "15",
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
