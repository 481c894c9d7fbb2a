"""Where `make test`'s time goes: runs a command (by default the suite's parallel part, as the
Makefile runs it) while it samples /proc once a second, and prints the command's wall time, the
machine's busy share (/proc/stat) and the CPU-seconds of each kind of process it saw (training
processes, Celery workers, API servers, the test processes themselves, ...).

A suite that keeps both cores busy gets faster only by doing less work; one that leaves them idle
gets faster by overlapping more. This tells the two apart, and says which processes the work is in.

    .venv/bin/python bench/suite_cpu.py                       # the parallel part of make test
    .venv/bin/python bench/suite_cpu.py -- .venv/bin/python -m pytest tests/worker/test_plumbing.py

A process is counted from its first sample (a process that lives under a second may be missed,
and one's last second before it exits is lost); kinds come from its command line when first seen.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HZ = os.sysconf("SC_CLK_TCK")
DEFAULT = [sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadfile", "-m", "not alone", "-q"]

#: (kind, a piece of the command line that marks it), first match wins.
KINDS = [
    ("training process", "tuneforge.worker.child"),
    ("training process", "tuneforge-run"),
    ("fork server", "tuneforge.worker.forkserver"),
    ("torchrun", "torch.distributed.run"),
    ("worker", " worker"),
    ("api server", " serve"),
    ("tuneforge command", "tuneforge"),
    ("test process", "pytest"),
    ("test process", "exec(eval("),  # pytest-xdist's test processes
]


def kind(comm: str, cmdline: str) -> str:
    for name, mark in KINDS:
        if mark in cmdline or mark == comm:
            return name
    return comm.split("/")[0].split(":")[0] or "?"


def busy_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


class Sampler:
    def __init__(self) -> None:
        self.seen: dict[tuple[str, str], list[object]] = {}  # (pid, start) -> [kind, cpu so far]
        self.cpu: Counter[str] = Counter()
        self.count: Counter[str] = Counter()
        self.stopped = threading.Event()

    def sample(self, first: bool) -> None:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                comm = stat[stat.index("(") + 1 : stat.rindex(")")]
                rest = stat.rsplit(")", 1)[1].split()
                cpu = (int(rest[11]) + int(rest[12])) / HZ
                key = (pid, rest[19])
                if key not in self.seen:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
                    name = kind(comm, cmdline)
                    self.seen[key] = [name, cpu if first else 0.0]  # before the command: not its
                    self.count[name] += 0 if first else 1
                entry = self.seen[key]
                self.cpu[str(entry[0])] += cpu - float(entry[1])  # type: ignore[arg-type]
                entry[1] = cpu
            except (OSError, ValueError, IndexError):
                continue

    def run(self) -> None:
        self.sample(first=True)
        while not self.stopped.wait(1.0):
            self.sample(first=False)
        self.sample(first=False)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", nargs="*", help="the command to run (after --); default: the suite")
    command = parser.parse_args().command or DEFAULT
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    sampler = Sampler()
    thread = threading.Thread(target=sampler.run, daemon=True)
    thread.start()
    busy0, total0 = busy_ticks()
    started = time.monotonic()
    rc = subprocess.call(command, cwd=REPO, env=env)
    wall = time.monotonic() - started
    busy1, total1 = busy_ticks()
    sampler.stopped.set()
    thread.join()
    cores = os.cpu_count() or 1
    print(f"\ncommand: {' '.join(command)}\nexit status {rc}, wall {wall:.0f} s")
    print(f"machine busy {100 * (busy1 - busy0) / (total1 - total0):.0f}% of {cores} cores")
    print(f"{'CPU-s':>8} {'share':>6} {'started':>8}  kind")
    counted = sum(v for v in sampler.cpu.values() if v > 0) or 1.0
    for name, seconds in sampler.cpu.most_common():
        if seconds >= 1:
            print(f"{seconds:8.0f} {100 * seconds / counted:5.0f}% {sampler.count[name]:8d}  {name}")
    sys.exit(rc)


if __name__ == "__main__":
    main()
