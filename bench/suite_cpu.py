"""Where `make test`'s time goes: runs a command (by default the suite's parallel part, as the
Makefile runs it) while it samples /proc once a second, and prints the command's wall time, the
machine's busy share (/proc/stat) and the CPU-seconds of each kind of process it saw (training
processes, Celery workers, API servers, the test processes themselves, ...).

A suite that keeps both cores busy gets faster only by doing less work; one that leaves them idle
gets faster by overlapping more. This tells the two apart, and says which processes the work is in.

    .venv/bin/python bench/suite_cpu.py                       # the parallel part of make test
    .venv/bin/python bench/suite_cpu.py -- .venv/bin/python -m pytest tests/worker/test_plumbing.py
    .venv/bin/python bench/suite_cpu.py --processes procs.jsonl   # and one line per process

`--processes` writes each process's kind, CPU-seconds, lifetime and TUNEFORGE_DATA_DIR (which
test module's services it belongs to: its temporary directory is named after the fixture), so
that the work can be traced to the tests that cause it.

A process is counted from its first sample (a process that lives under a second may be missed,
and one's last second before it exits is lost); kinds come from its command line when first seen
(a fork server's fork, whose command line is the server's, from the name it takes).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HZ = os.sysconf("SC_CLK_TCK")
DEFAULT = [sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadfile", "-m", "not alone", "-q"]

#: (kind, a piece of the command line that marks it), first match wins.
KINDS = [
    ("training process", "tuneforge.worker.child"),
    ("training process", "tuneforge-run"),  # forked by a fork server: by its process name
    ("training process", "tf-rank-"),  # a forked rank of a multi-device run: tf-rank-N
    ("rank stand-in", "tuneforge.worker.rankproxy"),
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
        if mark in cmdline or comm.startswith(mark):
            return name
    return comm.split("/")[0].split(":")[0] or "?"


def busy_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def data_dir(pid: str) -> str:
    try:
        for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            if item.startswith(b"TUNEFORGE_DATA_DIR="):
                return item.split(b"=", 1)[1].decode(errors="replace")
    except OSError:
        pass
    return ""


@dataclass
class Seen:
    """One process, from its first sample to its last."""

    pid: int
    kind: str
    cmdline: str
    data_dir: str
    cpu_at_first: float  # CPU-seconds it had used when first sampled (before the command: not its)
    cpu: float
    first: float  # seconds after the start
    last: float


class Sampler:
    def __init__(self) -> None:
        self.seen: dict[tuple[str, str], Seen] = {}  # (pid, start time) -> what was seen
        self.started = time.monotonic()
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
                now = time.monotonic() - self.started
                if key not in self.seen:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()
                    name = kind(comm, cmdline)
                    was = cpu if first else 0.0
                    self.seen[key] = Seen(int(pid), name, cmdline, data_dir(pid), was, was, now, now)
                    self.count[name] += 0 if first else 1
                entry = self.seen[key]
                if (
                    not first
                    and entry.kind == "fork server"
                    and (renamed := kind(comm, entry.cmdline)) != entry.kind
                ):
                    # a fork, seen before it took its name: counted from here as what it became
                    self.count[entry.kind] -= 1
                    self.count[renamed] += 1
                    entry.kind = renamed
                self.cpu[entry.kind] += cpu - entry.cpu
                entry.cpu, entry.last = cpu, now
            except (OSError, ValueError, IndexError):
                continue

    def run(self) -> None:
        self.sample(first=True)
        while not self.stopped.wait(1.0):
            self.sample(first=False)
        self.sample(first=False)


def fixture_of(data_dir: str) -> str:
    """The test fixture a data directory belongs to: pytest names a temporary directory after the
    name it was asked for (`mktemp("cli-service")` -> `.../popen-gw0/cli-service0`)."""
    match = re.search(r"/popen-gw\d+/([^/]+)", data_dir) or re.search(r"/pytest-\d+/([^/]+)", data_dir)
    return re.sub(r"\d+$", "", match.group(1)) if match else (data_dir or "(none)")


def print_training_by_fixture(seen: Iterable[Seen]) -> None:
    """Training processes' CPU-seconds by the test fixture whose services started them."""
    cpu: Counter[str] = Counter()
    count: Counter[str] = Counter()
    for entry in seen:
        if entry.kind == "training process" and entry.cpu > entry.cpu_at_first:
            fixture = fixture_of(entry.data_dir)
            cpu[fixture] += entry.cpu - entry.cpu_at_first
            count[fixture] += 1
    if cpu:
        print("\ntraining processes by the test fixture that started them (TUNEFORGE_DATA_DIR)")
        print(f"{'CPU-s':>8} {'count':>6}  fixture")
        for name, seconds in cpu.most_common(12):
            print(f"{seconds:8.0f} {count[name]:6d}  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", nargs="*", help="the command to run (after --); default: the suite")
    parser.add_argument("--processes", type=Path, help="write one JSON line per process seen here")
    args = parser.parse_args()
    command = args.command or DEFAULT
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
    print_training_by_fixture(sampler.seen.values())
    if args.processes:
        with args.processes.open("w") as out:
            for seen in sampler.seen.values():
                if seen.cpu > seen.cpu_at_first:
                    out.write(json.dumps(asdict(seen)) + "\n")
    sys.exit(rc)


if __name__ == "__main__":
    main()
