"""The parent side of a training process (see tuneforge/worker/child.py).

`TrainingProcess.spawn()` starts a training process that imports the training stack while the
worker waits for a job, so the first training step of a job comes soon after the job is claimed:
a fork of the worker's fork server, which has the stack imported already
(tuneforge/worker/forkserver.py), or else a fresh interpreter.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import IO, Any

from tuneforge.worker import forkserver


class TrainingProcess:
    """One child training process and the two pipes to it."""

    def __init__(
        self, popen: subprocess.Popen[bytes] | forkserver.ForkedProcess, messages: IO[str], log_path: Path
    ) -> None:
        self.popen = popen
        self.log_path = log_path
        self.messages: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, args=(messages,), daemon=True)
        self._reader.start()
        self._send_lock = threading.Lock()
        self.ready = False

    @classmethod
    def spawn(cls, log_path: Path, env: dict[str, str] | None = None) -> TrainingProcess:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        read_fd, write_fd = os.pipe()
        child_env = {**os.environ, **(env or {})}
        with log_path.open("ab") as log:
            popen = _forked(write_fd, log.fileno(), child_env) or subprocess.Popen(
                [sys.executable, "-m", "tuneforge.worker.child", str(write_fd)],
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=(write_fd,),
                env=child_env,
                close_fds=True,
            )
        os.close(write_fd)
        return cls(popen, os.fdopen(read_fd, "r"), log_path)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            try:
                self.messages.put(json.loads(line))
            except ValueError:
                continue
        self.messages.put(None)  # end of stream: the child has exited (or closed its pipe)

    def send(self, command: dict[str, Any]) -> None:
        assert self.popen.stdin is not None
        data = (json.dumps(command) + "\n").encode()
        with self._send_lock:
            try:
                self.popen.stdin.write(data)
                self.popen.stdin.flush()
            except (BrokenPipeError, ValueError):
                pass  # the child is gone; its exit code tells the story

    def wait_ready(self, timeout: float) -> bool:
        """Waits for the child's `ready` message (its imports done)."""
        if self.ready:
            return True
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                message = self.messages.get(timeout=remaining)
            except queue.Empty:
                return False
            if message is None:
                self.messages.put(None)
                return False
            if message.get("type") == "ready":
                self.ready = True
                return True
        return False

    def alive(self) -> bool:
        return self.popen.poll() is None

    def exit_code(self) -> int | None:
        return self.popen.poll()

    def stop(self, grace: float = 5.0) -> None:
        """Ends the child: closes its stdin (it exits by itself), then SIGTERM, then SIGKILL."""
        if self.popen.stdin is not None:
            with contextlib.suppress(OSError):
                self.popen.stdin.close()
        for sig, wait in ((None, grace), (signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            if sig is not None and self.popen.poll() is None:
                self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def last_log_lines(self, count: int = 20) -> list[str]:
        try:
            with self.log_path.open("r", errors="replace") as handle:
                return [line.rstrip("\n") for line in deque(handle, maxlen=count) if line.strip()]
        except OSError:
            return []


def _forked(messages: int, log: int, env: dict[str, str]) -> forkserver.ForkedProcess | None:
    """A training process from the worker's fork server, or None where there is none."""
    if not os.environ.get(forkserver.ADDRESS_ENV):
        return None
    stdin_read, stdin_write = os.pipe()
    try:
        process = forkserver.fork(stdin_read, messages, log, env, os.getcwd())
    finally:
        os.close(stdin_read)
    if process is None:
        os.close(stdin_write)
        return None
    process.stdin = os.fdopen(stdin_write, "wb")
    return process


def describe_exit(code: int | None) -> tuple[str, str]:
    """(error code, message) for a child that ended without a result."""
    if code is None:
        return "training_error", "the training process stopped answering"
    if code < 0:
        sig = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        if -code == signal.SIGKILL:
            return (
                "out_of_memory",
                f"the training process was killed by {sig} (most often the kernel's out-of-memory killer)",
            )
        return "training_error", f"the training process was killed by signal {sig}"
    return "training_error", f"the training process exited with code {code} without a result"
