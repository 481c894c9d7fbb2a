"""The stack the benchmarks run against, set up one way: a throwaway PostgreSQL database on
127.0.0.1:5432 (user postgres, trust), a private redis-server on a free port, a filesystem (or
moto S3) object store in a temporary directory, `tuneforge migrate`, tiny-chat built once, then
`tuneforge serve` on a free port (waited for, polling /healthz every 0.2 s) and W `tuneforge worker`
processes. Everything is stopped and dropped on exit.

    with BenchStack(workers=1) as stack:
        client = stack.sdk()
        ...

Benchmarks are run from the repository root, `python bench/x.py`; each puts the root on
sys.path before importing this module (`from bench.stack import BenchStack`).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.support import (  # noqa: E402
    RedisServer,
    create_database,
    drop_database,
    free_port,
    stop_process,
    tuneforge_env,
)
from tests.support.server import wait_healthy  # noqa: E402

CLI = [sys.executable, "-m", "tuneforge.cli"]


class BenchStack:
    """serve + `workers` worker processes on PostgreSQL, a private Redis and a local object store.

    `env` adds or overrides settings for every process; `s3` puts objects in moto's S3 server;
    `worker_args` are passed to each `tuneforge worker` (default: `--queues gpu`)."""

    def __init__(
        self,
        name: str = "bench",
        *,
        workers: int = 0,
        worker_args: tuple[str, ...] = ("--queues", "gpu"),
        env: dict[str, str] | None = None,
        s3: bool = False,
        build_tiny_chat: bool = True,
        keep_tmp: bool = False,
        admin_key: str | None = None,
    ) -> None:
        self.name = name
        self.workers = workers
        self.worker_args = worker_args
        self.extra_env = env or {}
        self.s3 = s3
        self.build_tiny_chat = build_tiny_chat
        self.keep_tmp = keep_tmp
        self.tmp = Path(tempfile.mkdtemp(prefix=f"tf-{name}-"))
        self.admin_key = admin_key or "tf-bench-" + uuid.uuid4().hex
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.redis = RedisServer(directory=self.tmp)
        self.db_name = ""
        self.db_url = ""
        self.env: dict[str, str] = {}
        self._moto: Any = None
        self._engine: Any = None

    @property
    def broker_url(self) -> str:
        return self.redis.url(0)

    def __enter__(self) -> BenchStack:
        try:
            self._set_up()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _set_up(self) -> None:
        self.db_name, self.db_url = create_database("tf_bench")
        self.redis.start()
        self.env = tuneforge_env(
            {
                "TUNEFORGE_DATA_DIR": str(self.tmp / "data"),
                "TUNEFORGE_MODELS_DIR": str(self.tmp / "models"),
                "TUNEFORGE_DATABASE_URL": self.db_url,
                "TUNEFORGE_BROKER_URL": self.broker_url,
                "TUNEFORGE_STORAGE_URL": f"file://{self.tmp / 'objects'}",
                "TUNEFORGE_ADMIN_KEY": self.admin_key,
                "PYTHONPATH": str(REPO),
            }
        )
        if self.s3:
            self._start_s3()
        self.env.update(self.extra_env)
        subprocess.run([*CLI, "migrate"], env=self.env, check=True, cwd=REPO, capture_output=True)
        if self.build_tiny_chat:
            subprocess.run(
                [*CLI, "models", "path", "tuneforge/tiny-chat"],
                env=self.env,
                check=True,
                cwd=REPO,
                capture_output=True,
            )
        self.start("serve", "serve", "--port", str(self.port))
        for i in range(self.workers):
            self.start(f"worker{i}", "worker", *self.worker_args)
        wait_healthy(self.base_url, self.processes["serve"], 120, self.tmp / "serve.log")

    def _start_s3(self) -> None:
        import os

        from moto.server import ThreadedMotoServer

        from tuneforge.storage.s3 import S3Store

        credentials = {
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        self.env.update(credentials)
        os.environ.update(credentials)
        self._moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._moto.start()
        host, port = self._moto.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        S3Store("tf-bench", endpoint_url=endpoint, create_bucket=True)
        self.env.update(
            {"TUNEFORGE_STORAGE_URL": "s3://tf-bench/objects", "TUNEFORGE_S3_ENDPOINT_URL": endpoint}
        )

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        """`tuneforge ARGS...` with the stack's settings, its output in TMP/NAME.log."""
        with (self.tmp / f"{name}.log").open("ab") as log:
            process = subprocess.Popen(
                [*CLI, *args],
                env=self.env,
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.processes[name] = process
        return process

    @property
    def serve_pid(self) -> int:
        return self.processes["serve"].pid

    def sdk(self, key: str | None = None) -> Any:
        from openai import OpenAI

        return OpenAI(base_url=self.base_url + "/v1", api_key=key or self.admin_key, max_retries=2)

    def engine(self) -> Any:
        """A small SQLAlchemy engine on the stack's database (disposed on exit)."""
        if self._engine is None:
            from tuneforge.db import make_engine

            self._engine = make_engine(self.db_url, pool_size=1, max_overflow=0)
        return self._engine

    def logs(self) -> str:
        return "\n".join(
            f"== {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.tmp.glob("*.log"))
        )

    def close(self) -> None:
        for process in self.processes.values():
            stop_process(process, timeout=30)
        self.processes.clear()
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
        if self.db_name:
            drop_database(self.db_name)
            self.db_name = ""
        self.redis.stop()
        if self._moto is not None:
            self._moto.stop()
            self._moto = None
        if not self.keep_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
