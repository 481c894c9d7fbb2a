"""Process trees: a worker starts pool processes, which start training processes."""

from __future__ import annotations

import contextlib
import signal
import subprocess
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]


def _family(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_tree(pid: int, sig: int) -> None:
    """Signals a process and every descendant."""
    for proc in _family(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(sig)


def stop_process(
    process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 30, tree: bool = True
) -> None:
    """Sends `sig` to the process (and its descendants when `tree`), waits up to `timeout` s for
    it, then SIGKILLs it and every descendant still alive, re-parented ones included."""
    descendants = _family(process.pid)[1:]
    if tree:
        kill_tree(process.pid, sig)
    else:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        descendants += _family(process.pid)[1:]
        kill_tree(process.pid, signal.SIGKILL)
        process.wait()
    _, alive = psutil.wait_procs(descendants, timeout=5)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
