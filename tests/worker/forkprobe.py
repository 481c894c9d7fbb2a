"""A training runner for tests/worker/test_forkserver.py: reports what its process sees (as a
notice), writes a line to its log, then fails on purpose (the run's end needs no outputs)."""

from __future__ import annotations

import os
import sys
import threading

from tuneforge.models.spec import JobSpec
from tuneforge.training.interface import RunObserver, RunPaths, RunResult

STACK = ("torch", "transformers", "peft", "trl", "tuneforge.training.supervised")


def probe(spec: JobSpec, paths: RunPaths, observer: RunObserver) -> RunResult:
    with open(f"/proc/{os.getpid()}/comm") as comm:
        name = comm.read().strip()
    seen = {
        "env": os.environ.get("TUNEFORGE_PROBE"),
        "cwd": os.getcwd(),
        "pid": os.getpid(),
        "parent": os.getppid(),
        "name": name,
        "stack_imported": all(module in sys.modules for module in STACK),
        "threads_before_run": threading.active_count(),
    }
    print("probe's log line", flush=True)
    observer.on_notice("probe", seen)
    raise RuntimeError("probe done")
