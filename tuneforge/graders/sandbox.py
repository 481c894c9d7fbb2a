"""`python` graders: the user's `grade(sample, item)` run in a separate, throwaway process.

Each run starts a fresh interpreter (`python -I -B`: no PYTHON* variables, no user site, no
current directory on the path, no bytecode written) with an empty environment, sends it the
source, the sample and the item on stdin and reads one JSON answer back. Before the user's code
runs, the process (see `_RUNNER`):

- moves into new network and mount namespaces with `unshare(2)`: it has no network interface but
  a loopback that is down, so every connection fails, and every mount it sees is remounted
  read-only; then into a new user namespace, so it holds no capability over those mounts (it
  cannot remount them writable) even when the worker runs as root. Where the kernel refuses a
  step, the answer's `isolation` says how far it got, and the limits and the audit hook below
  are what is left;
- sets hard resource limits: address space (`RLIMIT_AS`), CPU seconds (`RLIMIT_CPU`), file size
  0 (`RLIMIT_FSIZE`: it writes no files), no new processes (`RLIMIT_NPROC`) and few descriptors;
- installs an audit hook (PEP 578) that refuses sockets, subprocesses, `exec*`, `fork` and
  `ctypes`. Audit hooks are not a security boundary (code can reach the kernel without raising
  an event); they turn the common cases into a clear error. The namespaces and limits are the
  boundary; there is no seccomp filter.

The parent kills the whole process group at the wall-clock limit, and stops reading (and kills
it) once it has written more than `MAX_OUTPUT_BYTES`. Every failure is a value
(`SandboxOutcome.error`), never an exception: the caller turns it into `metadata.errors`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

#: Most bytes of answer (and anything else the grader writes to stdout) read back.
MAX_OUTPUT_BYTES = 1 << 20
#: Most characters of the grader's own prints kept; the rest is dropped.
MAX_PRINTED_CHARS = 4096

_RUNNER = r"""
import ctypes, json, os, resource, sys, traceback
payload = json.loads(sys.stdin.read())
limits = payload["limits"]
isolation = []
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
def check(result):
    if result != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
NEWNS, NEWUSER, NEWNET = 0x20000, 0x10000000, 0x40000000
RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
try:
    check(libc.unshare(NEWNET | NEWNS | (0 if os.geteuid() == 0 else NEWUSER)))
    isolation.append("network namespace")
    check(libc.mount(None, b"/", None, REC | PRIVATE, None))
    writable = []
    for line in open("/proc/self/mountinfo"):
        fields = line.split()
        flags = REMOUNT | BIND | RDONLY
        for name, bit in (("nosuid", NOSUID), ("nodev", NODEV), ("noexec", NOEXEC)):
            if name in fields[5].split(","):
                flags |= bit
        point = fields[4].encode().decode("unicode_escape").encode("latin-1")
        if libc.mount(None, point, None, flags, None) != 0:
            writable.append(fields[4])
    isolation.append("read-only filesystem" + (f" but {', '.join(writable)}" if writable else ""))
    check(libc.unshare(NEWUSER))  # no capabilities over those mounts from here on
    isolation.append("user namespace")
except Exception as exc:
    isolation.append(f"namespaces incomplete ({exc})")
memory = limits["memory_bytes"]
cpu = limits["cpu_seconds"]
# CPU: SIGXCPU at the soft limit (reported as the time limit), SIGKILL a second later at the hard
# one; with both equal the kernel sends SIGKILL alone, which reads as an unexplained kill.
for which, value, hard in (
    (resource.RLIMIT_AS, memory, memory),
    (resource.RLIMIT_CPU, cpu, cpu + 1),
    (resource.RLIMIT_FSIZE, 0, 0),
    (resource.RLIMIT_NPROC, 0, 0),
    (resource.RLIMIT_NOFILE, 32, 32),
    (resource.RLIMIT_CORE, 0, 0),
):
    try:
        resource.setrlimit(which, (value, hard))
    except (ValueError, OSError):
        isolation.append(f"limit {which} not set")
BLOCKED = ("socket.", "subprocess.", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.system",
           "os.forkpty", "pty.", "ctypes.", "os.kill", "os.killpg", "signal.pthread_kill", "sys.addaudithook")
def audit(event, args):
    if event.startswith(BLOCKED):
        raise PermissionError(f"{event} is not allowed in a python grader (no network, no processes)")
out = os.fdopen(os.dup(1), "w")
class Printed:
    def __init__(self):
        self.text = ""
    def write(self, text):
        room = MAX_PRINTED - len(self.text)
        if room > 0:
            self.text += str(text)[:room]
        return len(text)
    def flush(self):
        pass
printed = Printed()
sys.stdout = sys.stderr = printed
os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
os.dup2(1, 2)
answer = {"isolation": isolation}
sys.addaudithook(audit)
try:
    namespace = {"__name__": "grader"}
    exec(compile(payload["source"], "<grader>", "exec"), namespace)
    reward = namespace["grade"](payload["sample"], payload["item"])
    if isinstance(reward, bool) or not isinstance(reward, (int, float)):
        raise TypeError(f"grade() must return a number, not {type(reward).__name__}")
    answer["reward"] = float(reward)
except MemoryError:
    answer["error"] = "MemoryError: the grader went over its memory limit"
    answer["kind"] = "memory"
except BaseException as exc:
    answer["error"] = "".join(traceback.format_exception_only(type(exc), exc)).strip()[-2000:]
    answer["kind"] = "exception"
answer["printed"] = printed.text
out.write(json.dumps(answer))
out.flush()
os._exit(0)
"""


@dataclass(frozen=True)
class SandboxLimits:
    timeout_seconds: float = 10.0
    memory_mb: int = 512


@dataclass
class SandboxOutcome:
    reward: float | None = None
    error: str | None = None  # what went wrong, for `python_grader_runtime_error_details`
    server_error: str | None = None  # the sandbox itself failed (`python_grader_server_error_type`)
    timed_out: bool = False
    isolation: list[str] | None = None
    printed: str = ""


def run_python_grader(
    source: str, sample: dict[str, Any], item: Any, limits: SandboxLimits
) -> SandboxOutcome:
    """Runs `grade(sample, item)` from `source` in a sandboxed process; never raises for what the
    grader does."""
    try:
        payload = json.dumps(
            {
                "source": source,
                "sample": sample,
                "item": item,
                "limits": {
                    "memory_bytes": limits.memory_mb << 20,
                    "cpu_seconds": max(1, math.ceil(limits.timeout_seconds)),
                },
            }
        ).encode()
    except (TypeError, ValueError, RecursionError) as exc:
        return SandboxOutcome(error=f"the item cannot be sent to the grader as JSON: {exc}")
    runner = _RUNNER.replace("MAX_PRINTED", str(MAX_PRINTED_CHARS))
    try:
        process = subprocess.Popen(
            [sys.executable, "-I", "-B", "-c", runner],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env={"PATH": "/usr/bin:/bin", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"},
            cwd="/",
            start_new_session=True,
            close_fds=True,
        )
    except OSError as exc:
        return SandboxOutcome(server_error=f"{type(exc).__name__}: {exc}")
    deadline = time.monotonic() + limits.timeout_seconds + 1.0  # interpreter start-up on top
    try:
        output, overflow, timed_out = _exchange(process, payload, deadline)
    finally:
        _kill_group(process)
    if timed_out:
        return SandboxOutcome(
            error=f"the grader ran past its time limit ({limits.timeout_seconds:g} s)", timed_out=True
        )
    if overflow:
        return SandboxOutcome(error=f"the grader wrote more than {MAX_OUTPUT_BYTES} bytes of output")
    return _outcome(process.returncode, output, limits)


def _exchange(process: subprocess.Popen[bytes], payload: bytes, deadline: float) -> tuple[bytes, bool, bool]:
    """Sends the payload, reads stdout until it closes; (output, over the limit, timed out)."""
    assert process.stdin is not None and process.stdout is not None
    try:
        process.stdin.write(payload)
        process.stdin.close()
    except (BrokenPipeError, OSError):
        pass  # it died at once; its exit says why
    chunks: list[bytes] = []
    size = 0
    fd = process.stdout.fileno()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return b"", False, True
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        size += len(chunk)
        if size > MAX_OUTPUT_BYTES:
            return b"", True, False
        chunks.append(chunk)
    try:
        process.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return b"", False, True
    return b"".join(chunks), False, False


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        process.wait(timeout=5)
    if process.stdout is not None:
        process.stdout.close()


def _outcome(returncode: int | None, output: bytes, limits: SandboxLimits) -> SandboxOutcome:
    try:
        answer = json.loads(output.decode()) if output else None
    except (UnicodeDecodeError, ValueError):
        answer = None
    if not isinstance(answer, dict):
        if returncode is not None and returncode < 0:
            signum = -returncode
            if signum == signal.SIGXCPU:
                return SandboxOutcome(
                    error=f"the grader ran past its CPU time limit ({limits.timeout_seconds:g} s)",
                    timed_out=True,
                )
            if signum == signal.SIGXFSZ:
                return SandboxOutcome(error="the grader tried to write a file, which is not allowed")
            return SandboxOutcome(
                error=f"the grader's process was killed by signal {signal.Signals(signum).name}"
            )
        if returncode == 0 and output:
            return SandboxOutcome(error="the grader wrote to stdout directly; its answer cannot be read")
        return SandboxOutcome(error=f"the grader's process exited with status {returncode} without an answer")
    isolation = answer.get("isolation") if isinstance(answer.get("isolation"), list) else None
    printed = str(answer.get("printed") or "")
    if "error" in answer:
        error = str(answer["error"])
        if answer.get("kind") == "memory":
            error = f"the grader went over its memory limit ({limits.memory_mb} MiB)"
        return SandboxOutcome(error=error, isolation=isolation, printed=printed)
    reward = answer.get("reward")
    if not isinstance(reward, int | float) or not math.isfinite(reward):
        return SandboxOutcome(
            error="grade() must return a finite number", isolation=isolation, printed=printed
        )
    return SandboxOutcome(reward=float(reward), isolation=isolation, printed=printed)
