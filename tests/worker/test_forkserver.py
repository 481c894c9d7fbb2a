"""The fork server (tuneforge/worker/forkserver.py), real: `python -m tuneforge.worker.forkserver`
importing the real training stack, and training processes forked from it through
TrainingProcess.spawn, as a pool process starts them. The runner is a probe that reports what the
forked process sees (tests/worker/forkprobe.py)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import psutil
import pytest

from tests.support import REPO, wait_for
from tuneforge.worker import forkserver
from tuneforge.worker.supervisor import TrainingProcess, describe_exit

PROBE = "tests.worker.forkprobe:probe"
SPEC = {"model": "tuneforge/tiny-chat", "training_file": "file-probe"}
# The server imports torch, transformers, PEFT and TRL before it answers (about 15 s alone,
# minutes on a loaded machine).
READY_TIMEOUT_S = 300.0


@pytest.fixture(scope="module")
def server() -> Iterator[subprocess.Popen[bytes]]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", str(REPO))
        patch.delenv("TUNEFORGE_TRAINING_RUNNER", raising=False)  # the real stack's warm-up
        patch.chdir(REPO)
        started = forkserver.start()
        assert started is not None
        try:
            yield started
        finally:
            forkserver.stop(started)
    assert not os.path.exists(os.path.dirname(started.args[-1]))  # type: ignore[index]


def _run(process: TrainingProcess, tmp: Path) -> None:
    paths = {"model_dir": str(tmp), "train_file": str(tmp / "train.jsonl"), "out_dir": str(tmp / "out")}
    process.send({"op": "run", "spec": SPEC, "paths": paths, "runner": PROBE})


def _messages(process: TrainingProcess, timeout: float = 60) -> Iterator[dict[str, Any]]:
    while (message := process.messages.get(timeout=timeout)) is not None:
        yield message


def test_a_forked_process_runs_a_job_with_its_callers_environment_and_directory(
    server: subprocess.Popen[bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    process = TrainingProcess.spawn(tmp_path / "child.log", env={"TUNEFORGE_PROBE": "from the caller"})
    assert isinstance(process.popen, forkserver.ForkedProcess)
    assert process.wait_ready(READY_TIMEOUT_S)
    _run(process, tmp_path)
    messages = list(_messages(process))
    (seen,) = [m["data"] for m in messages if m["type"] == "notice"]
    assert seen["env"] == "from the caller" and seen["cwd"] == str(tmp_path)
    assert seen["parent"] == server.pid and seen["pid"] == process.pid
    assert seen["name"] == forkserver.PROCESS_NAME.decode()
    assert seen["stack_imported"] is True  # torch, transformers, PEFT, TRL: imported by the server
    assert seen["threads_before_run"] <= 2  # itself and its command reader: nothing inherited
    assert messages[-1]["type"] == "error" and "probe done" in messages[-1]["message"]
    assert process.popen.wait(timeout=30) == 1
    assert "probe's log line" in (tmp_path / "child.log").read_text()


def test_exit_codes_follow_popen(server: subprocess.Popen[bytes], tmp_path: Path) -> None:
    ended = TrainingProcess.spawn(tmp_path / "a.log")
    assert ended.wait_ready(READY_TIMEOUT_S)
    ended.stop(grace=30)  # end of stdin: the child exits 3, never an orphan
    assert ended.exit_code() == 3
    killed = TrainingProcess.spawn(tmp_path / "b.log")
    assert killed.wait_ready(READY_TIMEOUT_S)
    os.kill(killed.pid, signal.SIGKILL)  # as the kernel's out-of-memory killer would
    wait_for(lambda: not killed.alive(), 30, "the killed process to be seen as ended")
    assert killed.exit_code() == -signal.SIGKILL
    assert describe_exit(killed.exit_code())[0] == "out_of_memory"


def _stand_in(tmp: Path, rank: int) -> tuple[subprocess.Popen[bytes], IO[str], IO[str], dict[str, Any]]:
    """A rank's stand-in as torchrun starts it (tuneforge/worker/rankproxy.py, its RANK, its own
    session), and the rank's end of the channel to the worker: (stand-in, rank's messages,
    commands to it, its `ready`)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp / "channel"))
    listener.listen(1)
    listener.settimeout(READY_TIMEOUT_S)
    env = {**os.environ, "PYTHONPATH": str(REPO), "RANK": str(rank), "TUNEFORGE_PROBE": f"rank {rank}"}
    with (tmp / "rank.log").open("ab") as log:
        stand_in = subprocess.Popen(
            [sys.executable, "-m", "tuneforge.worker.rankproxy", "--socket", str(tmp / "channel")],
            env=env,
            cwd=tmp,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    conn, _ = listener.accept()
    listener.close()
    messages, commands = conn.makefile("r"), conn.makefile("w")
    ready = json.loads(messages.readline())
    assert ready["type"] == "ready" and ready["rank"] == rank, ready
    return stand_in, messages, commands, ready


def test_a_rank_is_forked_for_its_stand_in_and_ends_as_it_does(
    server: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    stand_in, messages, commands, ready = _stand_in(tmp_path, 1)
    rank = psutil.Process(ready["pid"])
    assert rank.pid != stand_in.pid and rank.ppid() == server.pid
    assert rank.name() == f"{forkserver.RANK_NAME_PREFIX}1"
    assert os.getsid(rank.pid) == rank.pid  # a session of its own: Ctrl-C to the worker is not its
    paths = {
        "model_dir": str(tmp_path),
        "train_file": str(tmp_path / "t.jsonl"),
        "out_dir": str(tmp_path / "o"),
    }
    commands.write(json.dumps({"op": "run", "spec": SPEC, "paths": paths, "runner": PROBE}) + "\n")
    commands.flush()  # a socket's text file buffers whole blocks, lines or not
    sent = [json.loads(line) for line in messages]
    (seen,) = [m["data"] for m in sent if m["type"] == "notice"]
    assert seen["env"] == "rank 1" and seen["cwd"] == str(tmp_path) and seen["stack_imported"] is True
    assert sent[-1]["type"] == "error" and "probe done" in sent[-1]["message"]
    assert stand_in.wait(timeout=30) == 1  # the rank's exit status is the stand-in's
    assert "probe's log line" in (tmp_path / "rank.log").read_text()  # its stdout is the stand-in's


@pytest.mark.parametrize(
    ("signalled", "sig"),
    [
        ("stand-in", signal.SIGTERM),
        ("rank", signal.SIGKILL),
        ("stand-in", signal.SIGKILL),
    ],
    ids=["sigterm-passed-on", "rank-killed", "stand-in-killed"],
)
def test_a_rank_and_its_stand_in_end_together(
    server: subprocess.Popen[bytes],
    tmp_path: Path,
    signalled: str,
    sig: signal.Signals,
) -> None:
    """SIGTERM to the stand-in (torchrun ending its ranks) reaches the rank, which ends by it, and
    the stand-in ends by it too; a SIGKILLed rank (out of memory) leaves its stand-in ending as
    SIGKILLed; a SIGKILLed stand-in (torchrun's process group killed) takes its rank with it."""
    stand_in, _, _, ready = _stand_in(tmp_path, 0)
    rank = psutil.Process(ready["pid"])
    os.kill(stand_in.pid if signalled == "stand-in" else rank.pid, sig)
    assert stand_in.wait(timeout=30) == -sig  # torchrun sees its child end by that signal
    wait_for(lambda: not rank.is_running(), 30, "the rank to end")


def test_without_a_server_it_is_a_fresh_interpreter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(forkserver.ADDRESS_ENV, str(tmp_path / "no-server"))
    monkeypatch.setenv("TUNEFORGE_TRAINING_RUNNER", PROBE)  # no stack to import
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    process = TrainingProcess.spawn(tmp_path / "child.log")
    assert isinstance(process.popen, subprocess.Popen)
    assert process.wait_ready(120)
    assert "tuneforge.worker.child" in psutil.Process(process.pid).cmdline()
    process.stop(grace=30)


def test_without_a_server_a_stand_in_becomes_the_rank(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(forkserver.ADDRESS_ENV, str(tmp_path / "no-server"))
    monkeypatch.setenv("TUNEFORGE_TRAINING_RUNNER", PROBE)  # no stack to import
    stand_in, _, _, ready = _stand_in(tmp_path, 0)
    assert ready["pid"] == stand_in.pid  # exec'd: torchrun's child is the rank
    assert "tuneforge.worker.child" in psutil.Process(stand_in.pid).cmdline()
    stand_in.kill()
    stand_in.wait(timeout=30)


def test_a_process_with_a_second_thread_refuses_to_fork() -> None:
    """A fresh interpreter may fork; one more thread, and it may not. (The fresh case is checked in
    a fresh interpreter: this test process may run threads already, native ones too, left by an
    earlier test module.)"""
    fresh = subprocess.run(
        [sys.executable, "-c", "from tuneforge.worker.forkserver import fork_hazard; print(fork_hazard())"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    assert fresh.stdout.strip() == "None", fresh
    stop = threading.Event()
    helper = threading.Thread(target=stop.wait)
    helper.start()
    try:
        assert "threads run" in (forkserver.fork_hazard() or "")
    finally:
        stop.set()
        helper.join()


def test_the_server_ends_with_its_stdin_and_removes_its_socket(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TUNEFORGE_TRAINING_RUNNER": PROBE}
    directory = tmp_path / "sock"
    directory.mkdir(mode=0o700)
    address = directory / "socket"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tuneforge.worker.forkserver", str(address)], stdin=subprocess.PIPE, env=env
    )
    deadline = time.monotonic() + 120
    while not address.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert address.exists()
    assert proc.stdin is not None
    proc.stdin.close()
    assert proc.wait(timeout=120) == 0
    assert not directory.exists()
