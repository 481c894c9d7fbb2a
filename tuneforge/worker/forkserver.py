"""A fork server for training processes: the worker imports the training stack once, and each
training process is a fork of a process that has it imported already.

A fresh interpreter per training process (tuneforge/worker/child.py) imports torch, transformers,
PEFT and TRL again: about 10 CPU-seconds each, once per job and once per spare. The worker's main
process starts this server (`start`, before it forks its pool processes); a pool process asks it
for a training process (`fork`), passing the child's stdin, message pipe and log by SCM_RIGHTS with
its environment and directory. The server forks, the child becomes what `python -m
tuneforge.worker.child MSG_FD` would be, and the server reports its pid (with a pidfd) and, when it
ends, its exit status in Popen's convention (-9 when SIGKILLed).

Forking a process that has imported torch is safe only while it runs one thread and CUDA is not
initialised: the server checks both after its imports and steps aside (exits) otherwise, and so
does any request it cannot answer in time: pool processes then start fresh interpreters as before.
On a GPU machine bitsandbytes' import initialises CUDA (its cuda_specs.py asks for the device's
capability), so there the server steps aside by design. Its environment turns off the threads two
libraries start at import (pyarrow's jemalloc, OpenBLAS's pool) unless the administrator set them.

The ranks of a multi-device run are forks too: torchrun starts a thin stand-in per rank
(tuneforge/worker/rankproxy.py) that asks for the rank (`fork_rank`), passes on its signals and
exits as the rank did; the rank ends itself when its stand-in ends, so ending torchrun's process
group still ends every rank.

Protocol (SOCK_SEQPACKET, one message each): request {"env": {...}, "cwd": "..."} with fds
[stdin, messages, log], or for a rank {"env", "cwd", "args": [...]} with fds [stdin, stdout,
stderr]; reply {"pid": N} with a pidfd; later {"exit": code}.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import select
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import IO, Any

log = logging.getLogger(__name__)

ADDRESS_ENV = "TUNEFORGE_FORK_SERVER"  # the socket's path, inherited by the pool processes
PROCESS_NAME = b"tuneforge-run"  # a forked training process's name (its command line is the server's)
RANK_NAME_PREFIX = "tf-rank-"  # a forked rank's name, and its RANK (a process name holds 15 characters)
FORK_SAFE_ENV = {
    "JE_ARROW_MALLOC_CONF": "background_thread:false",  # pyarrow's jemalloc: no thread at import
    "OPENBLAS_NUM_THREADS": "1",  # numpy's OpenBLAS: no thread pool at import
    "PYTORCH_NVML_BASED_CUDA_CHECK": "1",  # torch.cuda.is_available() without initialising CUDA
}
BIND_TIMEOUT_S = 30.0
# A pool process waits this long for its fork (the server may still be importing the stack, or
# busy): beyond it, a fresh interpreter.
FORK_TIMEOUT_S = 180.0
# How long an ended process's exit status may take to arrive from the server.
REPORT_TIMEOUT_S = 30.0
UNKNOWN_EXIT = 255  # the server went away before it reported the exit status


# ---------- the worker's side ----------


def start() -> subprocess.Popen[bytes] | None:
    """Starts this worker's fork server and puts its address in the environment the pool
    processes inherit. None (and fresh interpreters for every training process) when it cannot
    start. The server imports the stack in the background; requests wait for it. Its output goes
    to the worker's."""
    directory = tempfile.mkdtemp(prefix="tuneforge-fork-")  # 0700: only this user may connect
    address = os.path.join(directory, "socket")
    env = {**FORK_SAFE_ENV, **os.environ}
    server = subprocess.Popen(
        [sys.executable, "-m", "tuneforge.worker.forkserver", address],
        stdin=subprocess.PIPE,  # its end is the worker's end: the server exits with the worker
        env=env,
        close_fds=True,
    )
    deadline = time.monotonic() + BIND_TIMEOUT_S
    while not os.path.exists(address):
        if server.poll() is not None or time.monotonic() > deadline:
            log.warning("fork server did not start; training processes start fresh interpreters")
            stop(server)
            shutil.rmtree(directory, ignore_errors=True)
            return None
        time.sleep(0.02)
    os.environ[ADDRESS_ENV] = address
    log.info("fork server %s started at %s", server.pid, address)
    return server


def stop(server: subprocess.Popen[bytes] | None) -> None:
    """Ends the server (its training processes run on; each ends with its own supervisor)."""
    os.environ.pop(ADDRESS_ENV, None)
    if server is None:
        return
    if server.stdin is not None:
        with contextlib.suppress(OSError):
            server.stdin.close()
    try:
        server.wait(timeout=5)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


# ---------- the pool process's side ----------


def fork(stdin: int, messages: int, log_file: int, env: dict[str, str], cwd: str) -> ForkedProcess | None:
    """A training process forked by this worker's server, or None (no server, or it did not
    answer in time): the caller then starts a fresh interpreter."""
    return _ask({"env": env, "cwd": cwd}, [stdin, messages, log_file])


def fork_rank(args: list[str]) -> ForkedProcess | None:
    """One rank of a multi-device run, `python -m tuneforge.worker.child ARGS` as forked by this
    worker's server, for its stand-in (tuneforge/worker/rankproxy.py): the stand-in's stdin,
    stdout, stderr, environment (torchrun's RANK, WORLD_SIZE, ...) and directory, and it ends
    itself when the stand-in ends. None where there is no server."""
    return _ask({"env": dict(os.environ), "cwd": os.getcwd(), "args": args}, [0, 1, 2])


def _ask(request: dict[str, Any], fds: list[int]) -> ForkedProcess | None:
    address = os.environ.get(ADDRESS_ENV)
    if not address:
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        conn.settimeout(FORK_TIMEOUT_S)
        conn.connect(address)
        socket.send_fds(conn, [json.dumps(request).encode()], fds)
        reply, reply_fds, _, _ = socket.recv_fds(conn, 4096, 1)
        pid = int(json.loads(reply)["pid"])
        (pidfd,) = reply_fds
    except (OSError, ValueError, KeyError) as error:
        log.warning("fork server %s did not fork a training process (%s); a fresh one starts", address, error)
        conn.close()
        return None
    return ForkedProcess(conn, pid, pidfd)


class ForkedProcess:
    """What a TrainingProcess uses of a Popen (pid, stdin, poll, wait, send_signal), for a
    process forked by the server: its pidfd says when it has ended, the server says how."""

    args = "tuneforge-run"

    def __init__(self, conn: socket.socket, pid: int, pidfd: int) -> None:
        self.pid = pid
        self.stdin: IO[bytes] | None = None
        self.returncode: int | None = None
        self._conn = conn
        self._pidfd = pidfd

    def _ended(self, timeout: float | None) -> bool:
        readable, _, _ = select.select([self._pidfd], [], [], timeout)
        return bool(readable)

    def _collect(self) -> int:
        """The exit status, once the process has ended."""
        code = UNKNOWN_EXIT
        try:
            self._conn.settimeout(REPORT_TIMEOUT_S)
            code = int(json.loads(self._conn.recv(4096))["exit"])
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("training process %s ended; the fork server did not say how", self.pid)
        self.returncode = code
        self._conn.close()
        os.close(self._pidfd)
        return code

    def poll(self) -> int | None:
        if self.returncode is not None:
            return self.returncode
        return self._collect() if self._ended(0) else None

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is not None:
            return self.returncode
        if not self._ended(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        return self._collect()

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, sig)


# ---------- the server ----------


@dataclass
class _Request:
    env: dict[str, str]
    cwd: str
    fds: list[int]
    args: list[str] | None = None  # a rank's arguments to tuneforge.worker.child
    watch: int | None = None  # a rank's: its stand-in's pidfd


def fork_hazard() -> str | None:
    """Why this process must not fork training processes now, or None."""
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:
        return f"{threads} threads run"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return "CUDA is initialised"
    return None


def serve(address: str) -> _Request | None:
    """The server's loop, until its stdin ends. Returns in a forked child only: what it must run."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(address)
    listener.listen(64)
    from tuneforge.worker.child import DEFAULT_RUNNER, warm_up

    warm_up(os.environ.get("TUNEFORGE_TRAINING_RUNNER", DEFAULT_RUNNER))
    if hazard := fork_hazard():
        print(f"fork server: not forking training processes ({hazard}); they start fresh", flush=True)
        return None
    children: dict[int, tuple[int, socket.socket | None]] = {}  # pidfd -> (pid, client)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, "accept")
    selector.register(sys.stdin.fileno(), selectors.EVENT_READ, "stdin")
    while True:
        for key, _ in selector.select():
            if key.data == "stdin":
                if not os.read(sys.stdin.fileno(), 4096):
                    return None  # the worker is gone
            elif key.data == "accept":
                conn, _ = listener.accept()
                selector.register(conn, selectors.EVENT_READ, "request")
            elif key.data == "request":
                conn = key.fileobj  # type: ignore[assignment]
                selector.unregister(conn)
                request = _read_request(conn)
                if request is None:
                    conn.close()
                    continue
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    selector.close()
                    listener.close()
                    conn.close()
                    for _, other in children.values():
                        if other is not None:
                            other.close()
                    return request
                for fd in request.fds:
                    os.close(fd)
                if request.watch is not None:
                    os.close(request.watch)
                pidfd = os.pidfd_open(pid)
                try:
                    socket.send_fds(conn, [json.dumps({"pid": pid}).encode()], [pidfd])
                    client: socket.socket | None = conn
                except OSError:  # the pool process gave up waiting: the child ends with its stdin
                    conn.close()
                    client = None
                children[pidfd] = (pid, client)
                selector.register(pidfd, selectors.EVENT_READ, "child")
            else:  # a child ended
                pidfd = key.fd
                selector.unregister(pidfd)
                pid, client = children.pop(pidfd)
                os.close(pidfd)
                _, status = os.waitpid(pid, 0)
                if client is not None:
                    with contextlib.suppress(OSError):
                        client.send(json.dumps({"exit": os.waitstatus_to_exitcode(status)}).encode())
                    client.close()


def _read_request(conn: socket.socket) -> _Request | None:
    """A request from a process of this server's user, or None."""
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        peer, uid, _ = struct.unpack("3i", creds)
        data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
    except OSError:
        return None
    if uid != os.getuid() or len(fds) != 3:
        for fd in fds:
            os.close(fd)
        return None
    try:
        body = json.loads(data)
        request = _Request(env=dict(body["env"]), cwd=str(body["cwd"]), fds=fds)
        if body.get("args") is not None:  # a rank: it ends with its stand-in, the peer
            request.args = [str(arg) for arg in body["args"]]
            request.watch = os.pidfd_open(peer)
        return request
    except (ValueError, KeyError, TypeError, OSError):
        for fd in fds:
            os.close(fd)
        return None


def become_training_process(request: _Request) -> int:
    """In a forked child: take the request's stdin, log, environment and directory, then run as
    `python -m tuneforge.worker.child MSG_FD` would (a rank: as `... child ARGS`)."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL if sig != signal.SIGINT else signal.default_int_handler)
    if request.args is None:
        stdin, messages, log_file = request.fds
        stdio = [stdin, log_file, log_file]
        argv = ["child", str(messages)]
        name = PROCESS_NAME
    else:
        stdio = request.fds
        argv = ["child", *request.args]
        name = f"{RANK_NAME_PREFIX}{request.env.get('RANK', '')}".encode()
    for target, fd in enumerate(stdio):
        os.dup2(fd, target)
    for fd in set(stdio):
        os.close(fd)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the process's own stdin, for its life
    os.chdir(request.cwd)
    os.environ.clear()
    os.environ.update(request.env)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").prctl(15, name, 0, 0, 0)  # PR_SET_NAME
    if request.watch is not None:
        os.setsid()  # out of the worker's process group, as torchrun's ranks are: Ctrl-C is the worker's
        _end_with(request.watch)
    from tuneforge.config import get_settings

    get_settings.cache_clear()  # the job's environment, not the server's
    torch = sys.modules.get("torch")
    if torch is not None and (threads := request.env.get("OMP_NUM_THREADS", "")).isdigit():
        torch.set_num_threads(max(1, int(threads)))
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()  # a fresh interpreter's numpy draws its own seed; a fork would share one
    from tuneforge.worker import child

    return child.main(argv)


def _end_with(pidfd: int) -> None:
    """A rank's SIGKILL to itself once its stand-in has ended (killed with torchrun's process group,
    which the rank, a child of the server, is not in)."""

    def watch() -> None:
        select.select([pidfd], [], [])
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="rank-stand-in-watch", daemon=True).start()


def _cleanup(directory: str, server_pid: int) -> None:
    if os.getpid() == server_pid:
        shutil.rmtree(directory, ignore_errors=True)


def main(argv: list[str]) -> int:
    address = argv[1]
    directory = os.path.dirname(address)
    server_pid = os.getpid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: end with the worker

    def on_sigterm(signum: int, _frame: Any) -> None:
        _cleanup(directory, server_pid)
        os._exit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        request = serve(address)
    except KeyboardInterrupt:
        request = None
    finally:
        _cleanup(directory, server_pid)
    if request is None:
        return 0
    return become_training_process(request)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
