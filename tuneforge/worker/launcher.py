"""The parent side of a multi-device run: torchrun (tuneforge/training/distributed.py) starts one
training process per device, each `python -m tuneforge.worker.child --socket PATH` (where the
worker has a fork server, a stand-in that has it forked: tuneforge/worker/rankproxy.py), and
every rank connects back to the worker on a Unix socket of this attempt's own.

The worker speaks to the run as to one training process (tuneforge/worker/supervisor.py): a
command goes to every rank; rank 0's messages are the run's; `ready` means every rank has its
imports done. No orphans: a rank exits when its socket closes (the worker stopped it or died),
torchrun ends the other ranks when one exits, and `stop` ends torchrun's whole process group
(a forked rank, not in it, ends itself with its stand-in).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import IO, Any

from tuneforge.config import Settings
from tuneforge.training.distributed import launch_command, launch_env
from tuneforge.worker.forkserver import ADDRESS_ENV
from tuneforge.worker.supervisor import TrainingProcess


class DistributedTrainingProcess(TrainingProcess):
    """torchrun and its `world_size` ranks, seen as one training process."""

    def __init__(
        self, popen: subprocess.Popen[bytes], server: socket.socket, world_size: int, log_path: Path
    ) -> None:
        self.world_size = world_size
        self.socket_dir = Path(server.getsockname()).parent
        self._server = server
        self._ranks: dict[int, IO[str]] = {}
        self._conns: list[socket.socket] = []
        self._readied = 0
        self._lock = threading.Lock()
        read_fd, write_fd = os.pipe()  # rank 0's messages, relayed to the base class's reader
        self._relay = os.fdopen(write_fd, "w", buffering=1)
        super().__init__(popen, os.fdopen(read_fd, "r"), log_path)
        threading.Thread(target=self._accept, daemon=True).start()
        threading.Thread(target=self._watch, daemon=True).start()

    @classmethod
    def spawn_ranks(
        cls, log_path: Path, world_size: int, env: dict[str, str] | None = None
    ) -> DistributedTrainingProcess:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        socket_dir = Path(tempfile.mkdtemp(prefix="tuneforge-ranks-"))
        path = socket_dir / "channel"
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(path))
        server.listen(world_size)
        module = "tuneforge.worker.rankproxy" if os.environ.get(ADDRESS_ENV) else "tuneforge.worker.child"
        with log_path.open("ab") as log:
            popen = subprocess.Popen(
                launch_command(world_size, module, "--socket", str(path)),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={
                    **os.environ,
                    **launch_env(),
                    **(env or {}),
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                },
                close_fds=True,
                start_new_session=True,  # its own process group: `stop` ends torchrun and every rank
            )
        return cls(popen, server, world_size, log_path)

    def _accept(self) -> None:
        for _ in range(self.world_size):
            try:
                conn, _ = self._server.accept()
            except OSError:
                return  # closed by stop or by the end of torchrun
            threading.Thread(target=self._read_rank, args=(conn,), daemon=True).start()

    def _read_rank(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.append(conn)
        reader, writer = conn.makefile("r"), conn.makefile("w", buffering=1)
        rank: int | None = None
        for line in reader:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if message.get("type") == "ready":
                rank = int(message.get("rank", 0))
                with self._lock:
                    self._ranks[rank] = writer
                    self._readied += 1
                    if self._readied == self.world_size:
                        self._forward({"type": "ready", "pid": self.popen.pid})
            elif rank == 0:
                self._forward(message)
        if rank == 0:
            with contextlib.suppress(OSError):
                self._relay.close()  # end of rank 0: end of the run's messages

    def _forward(self, message: dict[str, Any]) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._relay.write(json.dumps(message) + "\n")

    def _watch(self) -> None:
        """torchrun's end (all ranks gone, or none ever connected) ends the messages too."""
        self.popen.wait()
        with contextlib.suppress(OSError):
            self._server.close()
        with contextlib.suppress(OSError, ValueError):
            self._relay.close()

    def missing(self) -> str:
        """What keeps the run from being ready: the ranks that have not connected back to the
        worker or reported ready (a rank that never connected has no known number)."""
        with self._lock:
            ready, connected = sorted(self._ranks), len(self._conns)
        if not connected:
            state = "torchrun started no rank" if self.alive() else "torchrun ended before starting any rank"
            return f"none of the {self.world_size} ranks connected ({state}: its rendezvous is the suspect)"
        waiting = self.world_size - len(ready)
        return (
            f"{waiting} of {self.world_size} ranks not ready (ready: {ready or 'none'}; "
            f"connected to the worker: {connected} of {self.world_size})"
        )

    def send(self, command: dict[str, Any]) -> None:
        data = json.dumps(command) + "\n"
        with self._lock:
            writers = list(self._ranks.values())
        for writer in writers:
            with contextlib.suppress(OSError, ValueError):
                writer.write(data)
                writer.flush()

    def stop(self, grace: float = 5.0) -> None:
        """Closes every rank's socket (each exits by itself), then SIGTERM, then SIGKILL to
        torchrun's process group."""
        with self._lock:
            conns, self._ranks = list(self._conns), {}
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._server.close()
        for sig, wait in ((None, grace), (signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            if sig is not None and self.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, sig)
            try:
                self.popen.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(ProcessLookupError):  # a rank that outlived torchrun
            os.killpg(self.popen.pid, signal.SIGKILL)
        shutil.rmtree(self.socket_dir, ignore_errors=True)


#: What a multi-device run's start message adds to the start event.
START_FIELDS = ("world_size", "strategy", "strategy_asked", "local_params_per_rank")
#: Restarts of a multi-device run after a lost rank, within one attempt.
RANK_RESTARTS = 2
#: Seconds a worker waits before handing back a job on more devices than it has.
HAND_BACK_PAUSE_S = 5.0


def job_devices(spec: dict[str, Any]) -> int:
    return int((spec.get("hardware") or {}).get("count") or 1)


def worker_devices(settings: Settings) -> int:
    """Devices this worker trains on: `worker_devices`, else every visible GPU, else 1 (a CPU
    worker runs several gloo processes only with `worker_cpu_processes`)."""
    gpus = visible_gpus()
    if gpus:
        return min(settings.worker_devices or gpus, gpus)
    if settings.worker_cpu_processes:
        return settings.worker_devices or 1
    return 1


def visible_gpus() -> int:
    """GPUs this worker may use, without importing torch (CUDA_VISIBLE_DEVICES, else nvidia-smi)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in listed.stdout.splitlines() if line.startswith("GPU "))


def spawn_for(spec: dict[str, Any], log_path: Path) -> DistributedTrainingProcess:
    return DistributedTrainingProcess.spawn_ranks(log_path, job_devices(spec))


#: What gloo and NCCL say in rank 0 when another rank is gone mid-collective.
PEER_LOST_MARKERS = (
    "connection reset by peer",
    "connection closed by peer",
    "broken pipe",
    "pair.cc",
    "nccl communicator was aborted",
    "nccl error",
    "socket timeout",
)


def lost_peer(process: TrainingProcess, error: dict[str, Any]) -> bool:
    """Whether rank 0 of a multi-device run failed because another rank went away (its error
    is the collective's, not the job's): the run is restarted rather than failed."""
    if not isinstance(process, DistributedTrainingProcess):
        return False
    text = str(error.get("message", "")).lower()
    return any(marker in text for marker in PEER_LOST_MARKERS)
