"""The training process: `python -m tuneforge.worker.child MSG_FD`.

A fresh interpreter per job (CUDA is never initialised in a process that forks). It starts before
its job is known and imports the heavy libraries first, so a job that arrives finds a warm process;
then it reads one `run` command on stdin, calls the training entry point with an observer, and
reports on the message pipe. It knows nothing of the database or the object store: the worker
task that started it (the supervisor, tuneforge/worker/supervisor.py) does all of that.

Parent -> child (stdin, JSON lines): {"op": "run", "spec": {...}, "paths": {...}, "runner": "mod:fn"},
{"op": "stop", "reason": "cancel"|"pause"}, {"op": "ack", "step": N} (checkpoint stored).
Child -> parent (MSG_FD, JSON lines): ready, start, metrics, checkpoint, result, error.
End of stdin means the parent is gone: the child exits at once, so no training outlives its worker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from tuneforge.training import distributed, tokcache
from tuneforge.training.interface import RunInfo, RunPaths, RunResult, StepMetrics, StopReason

DEFAULT_RUNNER = "tuneforge.training.run:run_training"
CHECKPOINT_ACK_TIMEOUT_S = 600.0


class _Channel:
    """Both directions of the conversation with the supervisor."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._out_lock = threading.Lock()
        self._cond = threading.Condition()
        self.run_command: dict[str, Any] | None = None
        self.stop_reason: StopReason | None = None
        self.acked: set[int] = set()

    def send(self, message: dict[str, Any]) -> None:
        line = json.dumps(message, default=str)
        with self._out_lock:
            self._out.write(line + "\n")
            self._out.flush()

    def read_commands(self, commands: IO[str] | None = None) -> None:
        for line in commands or sys.stdin:
            if not line.strip():
                continue
            command = json.loads(line)
            with self._cond:
                op = command.get("op")
                if op == "run":
                    self.run_command = command
                elif op == "stop":
                    reason = command.get("reason")
                    if reason in ("cancel", "pause") and self.stop_reason != "cancel":
                        self.stop_reason = reason
                elif op == "ack":
                    self.acked.add(int(command["step"]))
                self._cond.notify_all()
        os._exit(3)  # the supervisor is gone: never train on as an orphan

    def wait_for_run(self) -> dict[str, Any]:
        with self._cond:
            while self.run_command is None:
                self._cond.wait()
            return self.run_command

    def wait_for_ack(self, step: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while step not in self.acked:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True


class ChannelObserver:
    """The RunObserver the training loop talks to. A checkpoint returns only once the supervisor
    has stored it, so a checkpoint the trainer later rotates away is never lost."""

    def __init__(self, channel: _Channel) -> None:
        self.channel = channel

    def on_start(self, info: RunInfo) -> None:
        self.channel.send(
            {"type": "start", **dataclasses.asdict(info), **tokcache.summary(), **distributed.summary()}
        )

    def on_metrics(self, metrics: StepMetrics) -> None:
        self.channel.send({"type": "metrics", **dataclasses.asdict(metrics)})

    def on_notice(self, message: str, data: dict[str, Any]) -> None:
        """Something to tell the job's events that does not stop the run (tuneforge.training.integrations)."""
        self.channel.send({"type": "notice", "message": message, "data": data})

    def on_checkpoint(self, step: int, path: Path, metrics: dict[str, Any]) -> None:
        self.channel.send({"type": "checkpoint", "step": step, "path": str(path), "metrics": metrics})
        if not self.channel.wait_for_ack(step, CHECKPOINT_ACK_TIMEOUT_S):
            raise RuntimeError(f"checkpoint at step {step} was not stored within {CHECKPOINT_ACK_TIMEOUT_S}s")

    def stop_requested(self) -> StopReason | None:
        return self.channel.stop_reason


def _load_runner(name: str) -> Callable[..., RunResult]:
    module_name, _, attr = name.partition(":")
    runner: Callable[..., RunResult] = getattr(importlib.import_module(module_name), attr)
    return runner


def warm_up(runner: str) -> None:
    """Import the training stack before the job arrives (the slow part of a cold start): here, or
    once in the worker's fork server (tuneforge/worker/forkserver.py). TRL loads its trainers
    lazily: the SFT and DPO trainers, most jobs' (about 2 CPU-seconds), are imported here too."""
    if runner == DEFAULT_RUNNER:
        with contextlib.suppress(Exception):  # reported properly when the job runs
            _load_runner(runner)
            importlib.import_module("tuneforge.training.supervised")  # torch, transformers, trl, peft
            from trl import DPOTrainer, SFTTrainer  # noqa: F401


def _connect(argv: list[str]) -> tuple[IO[str], IO[str] | None]:
    """(messages out, commands in): the message pipe and stdin, or for one rank of a multi-device
    run (`--socket PATH`, started by torchrun: tuneforge/worker/launcher.py) the worker's socket,
    both ways."""
    if argv[1] != "--socket":
        return os.fdopen(int(argv[1]), "w", buffering=1), None
    import socket

    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(argv[2])
    return conn.makefile("w", buffering=1), conn.makefile("r")


def main(argv: list[str]) -> int:
    out, commands = _connect(argv)
    channel = _Channel(out)
    threading.Thread(
        target=channel.read_commands, args=(commands,), name="supervisor-commands", daemon=True
    ).start()
    warm_runner = os.environ.get("TUNEFORGE_TRAINING_RUNNER", DEFAULT_RUNNER)
    warm_up(warm_runner)
    channel.send({"type": "ready", "pid": os.getpid(), "rank": distributed.rank()})
    command = channel.wait_for_run()
    try:
        from tuneforge.models.spec import JobSpec
        from tuneforge.training.base_models import resolve_model_path

        spec = JobSpec.model_validate(command["spec"])
        raw = command["paths"]
        tokcache.configure(Path(raw["tokcache_dir"]) if raw.get("tokcache_dir") else None)
        _inject_test_oom()
        model_dir = raw.get("model_dir") or resolve_model_path(
            spec.model, command.get("models", ""), Path(command["models_dir"])
        )
        paths = RunPaths(
            model_dir=Path(model_dir),
            train_file=Path(raw["train_file"]),
            out_dir=Path(raw["out_dir"]),
            valid_file=Path(raw["valid_file"]) if raw.get("valid_file") else None,
            resume_from=Path(raw["resume_from"]) if raw.get("resume_from") else None,
            model_id=spec.model,
            source_adapter=Path(raw["source_adapter"]) if raw.get("source_adapter") else None,
            source_state=Path(raw["source_state"]) if raw.get("source_state") else None,
        )
        runner = _load_runner(command.get("runner") or DEFAULT_RUNNER)
        result = runner(spec, paths, ChannelObserver(channel), **(command.get("options") or {}))
        channel.send({"type": "result", **_result_dict(result)})
        return 0
    except BaseException as error:
        channel.send(
            {
                "type": "error",
                "code": _error_code(error),
                "message": f"{type(error).__name__}: {error}",
                "traceback": traceback.format_exc(limit=20),
                **_out_of_memory_advice(error, command),
            }
        )
        return 1


def _out_of_memory_advice(error: BaseException, command: dict[str, Any]) -> dict[str, Any]:
    """For an out-of-memory error, what the estimator says would fit (tuneforge/worker/oom.py)."""
    if _error_code(error) != "out_of_memory":
        return {}
    from tuneforge.worker.oom import advice

    checkpointing = bool((command.get("options") or {}).get("gradient_checkpointing"))
    return {"advice": advice(command["spec"], checkpointing)}


def _inject_test_oom() -> None:
    """TEST ONLY (TUNEFORGE_TEST_OOM_ABOVE_MICRO_BATCH=N): every training step whose micro-batch
    is above N raises torch.OutOfMemoryError, as a GPU that is too small would; CPU memory cannot
    stand in for a GPU's in tests. With TUNEFORGE_TEST_OOM_AFTER_STEP=S, only once S optimizer
    steps are done (an error after a checkpoint). Unset (always, in production), nothing changes."""
    from tuneforge.config import get_settings

    settings = get_settings()
    limit = settings.test_oom_above_micro_batch
    if limit is None:
        return
    after = settings.test_oom_after_step or 0
    import torch
    import transformers

    original = transformers.Trainer.training_step

    def training_step(self: Any, *args: Any, **kwargs: Any) -> Any:
        micro = self.args.per_device_train_batch_size
        if micro > limit and self.state.global_step >= after:
            raise torch.OutOfMemoryError(
                f"CUDA out of memory (injected for tests: micro-batch {micro} > {limit}, "
                f"after step {self.state.global_step})"
            )
        return original(self, *args, **kwargs)

    transformers.Trainer.training_step = training_step  # type: ignore[method-assign]


def _result_dict(result: RunResult) -> dict[str, Any]:
    return {
        key: (str(value) if isinstance(value, Path) else value)
        for key, value in dataclasses.asdict(result).items()
    }


def _error_code(error: BaseException) -> str:
    from tuneforge.worker.incidents import DISK_FULL, is_disk_full

    text = f"{type(error).__name__} {error}".lower()
    if is_disk_full(error):
        return DISK_FULL
    if type(error).__name__ == "NonFiniteLoss":  # tuneforge.training.callbacks: the run diverged
        return "non_finite_loss"
    if type(error).__name__ == "DataError":  # tuneforge.training.data: the file cannot be trained on
        return "invalid_training_file"
    if (
        "out of memory" in text
        or isinstance(error, MemoryError)
        or type(error).__name__ == "OutOfMemoryError"
    ):
        return "out_of_memory"
    if type(error).__name__ in ("UnknownModel", "OSError") and "model" in text:
        return "model_load_failed"
    return "training_error"


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
