"""What the worker and a training run say to each other. No torch here: the worker imports this
in the parent process, and the run itself happens in a fresh child process.

The worker calls `tuneforge.training.run.run_training(spec, paths, observer)`; the run calls the
observer from the training loop and returns a `RunResult`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

StopReason = Literal["cancel", "pause"]


@dataclass(frozen=True)
class RunPaths:
    model_dir: Path  # local base model directory (see tuneforge.training.base_models)
    train_file: Path  # JSONL
    out_dir: Path  # everything the run writes: checkpoints/, adapter/, model/, merged/, metrics.csv
    valid_file: Path | None = None
    resume_from: Path | None = None  # a checkpoint directory written by an earlier run
    model_id: str | None = None  # recorded in adapter_config.json instead of model_dir
    # A continued job (issue 8): its parent's PEFT adapter, loaded as the trainable adapter, and
    # a checkpoint whose optimizer and scheduler state the run takes over.
    source_adapter: Path | None = None
    source_state: Path | None = None


@dataclass(frozen=True)
class RunInfo:
    """Told once, before the first step."""

    total_steps: int
    num_examples: int
    hyperparameters: dict[str, Any]  # the effective values, "auto" resolved
    trainable_params: int
    total_params: int
    start_step: int = 0  # > 0 when resumed from a checkpoint


@dataclass(frozen=True)
class StepMetrics:
    step: int
    total_steps: int
    epoch: float
    train_loss: float | None = None
    valid_loss: float | None = None
    learning_rate: float | None = None
    tokens_seen: int | None = None  # real (non-padding) tokens trained so far
    tokens_per_second: float | None = None
    train_mean_token_accuracy: float | None = None
    valid_mean_token_accuracy: float | None = None
    # Reinforcement fine-tuning (tuneforge.training.grpo): the step's sampled answers and their grades.
    reward: float | None = None  # mean grader reward
    reward_std: float | None = None
    kl: float | None = None  # mean KL to the reference model (beta > 0)
    completion_length: float | None = None  # mean tokens per sampled answer
    grader_failures: float | None = None  # samples the grader failed on (reward 0)
    eval_reward: float | None = None  # mean reward on the validation prompts


class RunObserver(Protocol):
    """Receives progress from inside the training loop. Calls must return quickly."""

    def on_start(self, info: RunInfo) -> None: ...

    def on_metrics(self, metrics: StepMetrics) -> None: ...

    def on_checkpoint(self, step: int, path: Path, metrics: dict[str, Any]) -> None: ...

    def stop_requested(self) -> StopReason | None:
        """Asked after every step; non-None stops the run after a final checkpoint."""
        ...


@dataclass
class RunResult:
    stopped: StopReason | None  # None when the run completed
    final_step: int
    total_steps: int
    trained_tokens: int
    metrics: dict[str, Any]  # final train_loss, valid_loss, ...
    adapter_dir: Path | None = None  # PEFT layout (None for `full`)
    model_dir: Path | None = None  # full weights (`full` only)
    merged_dir: Path | None = None  # when export includes "merged"
    gguf_dir: Path | None = None  # model.gguf and its Modelfile, when export includes "gguf*"
    tensorboard_dir: Path | None = None  # event files, with the tensorboard integration
    metrics_csv: Path | None = None
    last_checkpoint: Path | None = None
    trainable_params: int = 0
    total_params: int = 0
    warnings: dict[str, int] = field(default_factory=dict)  # e.g. {"truncated_examples": 3}
    report: dict[str, Any] = field(default_factory=dict)  # data statistics, effective hyperparameters
