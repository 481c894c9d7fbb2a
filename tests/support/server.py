"""`tuneforge` processes as an operator starts them: `tuneforge migrate` then `tuneforge serve`."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from .net import free_port
from .procs import REPO, stop_process


def tuneforge_env(overrides: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any TUNEFORGE_ setting, offline, plus `overrides`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEFORGE_")}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update(overrides or {})
    return env


def tuneforge_command() -> list[str]:
    script = Path(sys.executable).parent / "tuneforge"
    return [str(script)] if script.exists() else [sys.executable, "-m", "tuneforge.cli"]


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    base_url: str
    env: dict[str, str]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def logs(self) -> str:
        """The tail of each embedded process's log (worker, beat, inference), as the worker tests'
        `Services.logs()` and the e2e `Stack.logs()` give theirs: what `wait_for(logs=...)` shows."""
        logs = sorted((Path(self.env["TUNEFORGE_DATA_DIR"]) / "logs").glob("*.log"))
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-6000:]}" for p in logs)


def wait_healthy(base_url: str, process: subprocess.Popen[bytes], timeout: float, log: Path) -> None:
    """Polls GET /healthz (every 0.2 s) until it answers 200; raises with the log if the process
    exits or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"tuneforge serve exited with {process.returncode}:\n{log.read_text(errors='replace')}"
            )
        try:
            if httpx.get(base_url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"tuneforge serve did not answer in {timeout} s:\n{log.read_text(errors='replace')}")


def start_server(
    env_overrides: dict[str, str],
    data_dir: Path,
    *,
    migrate_first: bool = True,
    timeout: float = 90,
) -> Server:
    """`tuneforge migrate` then `tuneforge serve` on a free port, as `make run` does. The
    environment is this process's without TUNEFORGE_ settings (TUNEFORGE_MODELS_DIR kept), plus
    TUNEFORGE_DATA_DIR=`data_dir` and `env_overrides`."""
    env = tuneforge_env({"TUNEFORGE_DATA_DIR": str(data_dir)})
    if "TUNEFORGE_MODELS_DIR" in os.environ:
        env["TUNEFORGE_MODELS_DIR"] = os.environ["TUNEFORGE_MODELS_DIR"]
    env.update(env_overrides)
    tuneforge = tuneforge_command()
    if migrate_first:
        subprocess.run([*tuneforge, "migrate"], env=env, check=True, capture_output=True, timeout=180)
    port = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / f"server-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*tuneforge, "serve", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            start_new_session=True,
        )
    server = Server(process, f"http://127.0.0.1:{port}", env, log_path)
    try:
        wait_healthy(server.base_url, process, timeout, log_path)
    except BaseException:
        stop_server(server)
        raise
    return server


def stop_server(server: Server) -> None:
    stop_process(server.process, timeout=20, tree=False)
