"""The bridge between transformers' Trainer and the worker's RunObserver, plus the metrics CSV."""

from __future__ import annotations

import csv
import math
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from tuneforge.models.spec import PROMPT_LEARNING_ADAPTERS
from tuneforge.training import evaluation
from tuneforge.training.interface import RunInfo, RunObserver, StepMetrics, StopReason

if TYPE_CHECKING:
    from tuneforge.models.spec import EvaluationSpec

# OpenAI's results-file columns first, then ours.
CSV_COLUMNS = [
    "step",
    "train_loss",
    "train_accuracy",
    "valid_loss",
    "valid_mean_token_accuracy",
    "learning_rate",
    "epoch",
    "tokens_seen",
    "grad_norm",
    "reward_accuracy",  # DPO: share of pairs whose chosen reward beats the rejected one
    "reward_margin",  # DPO: mean chosen-minus-rejected reward
    # Reinforcement fine-tuning (GRPO): the grader's rewards of the step's sampled answers.
    "reward",
    "reward_std",
    "kl",
    "completion_length",
    "grader_failures",
    "eval_reward",
]
#: The GRPO trainer's log names of the reinforcement columns (and StepMetrics fields).
GRPO_LOGS = {
    "reward": "reward",
    "reward_std": "reward_std",
    "kl": "kl",
    "completions/mean_length": "completion_length",
    "grader_failures": "grader_failures",
}


class NonFiniteLoss(RuntimeError):
    """The training loss or the gradient norm is no longer a finite number: the run diverged
    (too high a learning rate or adapter alpha, an overflow in low precision) and nothing it
    trains from here on means anything."""


def check_finite(step: int, logs: dict[str, Any]) -> None:
    """Raises NonFiniteLoss when a step's logged loss or gradient norm is NaN or infinite."""
    bad = {}
    for name in ("loss", "grad_norm"):
        value = logs.get(name)
        if value is not None and not math.isfinite(float(value)):
            bad[name] = float(value)
    if bad:
        found = ", ".join(f"{name}={value}" for name, value in bad.items())
        raise NonFiniteLoss(
            f"training diverged at step {step} ({found}); "
            "lower the learning rate or the adapter's alpha, or check the data"
        )


class NullObserver:
    """An observer that listens to nothing and never asks to stop (the by-hand entry point)."""

    def on_start(self, info: RunInfo) -> None:
        pass

    def on_metrics(self, metrics: StepMetrics) -> None:
        pass

    def on_checkpoint(self, step: int, path: Path, metrics: dict[str, Any]) -> None:
        pass

    def stop_requested(self) -> StopReason | None:
        return None


def _number(value: Any) -> float | None:
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


class MetricsCsv:
    """`metrics.csv`, one row per optimizer step, written as steps finish (a row is flushed once
    its step's train and eval logs are both in). Rebuilt from the checkpoint's log history on resume."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._rows: dict[int, dict[str, Any]] = {}
        self._written: set[int] = set()

    def restart(self, log_history: list[dict[str, Any]]) -> None:
        self._rows.clear()
        self._written.clear()
        with self.path.open("w", newline="") as handle:
            csv.writer(handle).writerow(CSV_COLUMNS)
        for entry in log_history:
            self.add(entry)
        self.flush()

    def add(self, logs: dict[str, Any], tokens_seen: int | None = None) -> None:
        step = int(logs.get("step", 0))
        if step <= 0 or step in self._written:
            return
        row = self._rows.setdefault(step, {"step": step})
        if "loss" in logs:
            row["train_loss"] = _number(logs["loss"])
            row["train_accuracy"] = _number(logs.get("mean_token_accuracy"))
            row["learning_rate"] = _number(logs.get("learning_rate"))
            row["grad_norm"] = _number(logs.get("grad_norm"))
            row["epoch"] = _number(logs.get("epoch"))
            row["reward_accuracy"] = _number(logs.get("rewards/accuracies"))
            row["reward_margin"] = _number(logs.get("rewards/margins"))
            row.update({name: _number(logs.get(key)) for key, name in GRPO_LOGS.items()})
            if tokens_seen is not None:
                row["tokens_seen"] = tokens_seen
            elif "num_input_tokens_seen" in logs:
                row["tokens_seen"] = int(logs["num_input_tokens_seen"])
        if "eval_loss" in logs:
            row["valid_loss"] = _number(logs["eval_loss"])
            row["valid_mean_token_accuracy"] = _number(logs.get("eval_mean_token_accuracy"))
            row["eval_reward"] = _number(logs.get("eval_reward"))
        for earlier in sorted(s for s in self._rows if s < step):
            self._write(earlier)

    def flush(self) -> None:
        for step in sorted(self._rows):
            self._write(step)

    def _write(self, step: int) -> None:
        row = self._rows.pop(step)
        self._written.add(step)
        with self.path.open("a", newline="") as handle:
            csv.writer(handle).writerow(["" if row.get(c) is None else row[c] for c in CSV_COLUMNS])


class ObserverCallback(TrainerCallback):
    """Tells the observer about the run and asks it after every step whether to stop."""

    def __init__(
        self,
        observer: RunObserver,
        metrics_csv: MetricsCsv,
        *,
        num_examples: int,
        hyperparameters: dict[str, Any],
        trainable_params: int,
        total_params: int,
        checkpoints_dir: Path,
    ) -> None:
        self.observer = observer
        self.metrics_csv = metrics_csv
        self.num_examples = num_examples
        self.hyperparameters = hyperparameters
        self.trainable_params = trainable_params
        self.total_params = total_params
        self.checkpoints_dir = checkpoints_dir
        self.stopped: StopReason | None = None
        self.start_step = 0
        self.last_train: dict[str, Any] = {}
        self.last_eval: dict[str, Any] = {}
        self._clock = (0.0, 0)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.start_step = state.global_step
        self.metrics_csv.restart(state.log_history)
        self._clock = (time.perf_counter(), int(state.num_input_tokens_seen or 0))
        self.observer.on_start(
            RunInfo(
                total_steps=state.max_steps,
                num_examples=self.num_examples,
                hyperparameters=self.hyperparameters,
                trainable_params=self.trainable_params,
                total_params=self.total_params,
                start_step=state.global_step,
            )
        )

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        reason = self.observer.stop_requested()
        if reason is not None:
            self.stopped = reason
            control.should_training_stop = True
            control.should_save = True

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not logs or "train_loss" in logs:  # the end-of-training summary, not a step
            return
        check_finite(state.global_step, logs)
        tokens = int(state.num_input_tokens_seen or 0)
        self.metrics_csv.add({**logs, "step": state.global_step}, tokens_seen=tokens)
        started, tokens_at_start = self._clock
        elapsed = time.perf_counter() - started
        speed = (tokens - tokens_at_start) / elapsed if elapsed > 0 else None
        if "loss" in logs:
            self.last_train = {
                "train_loss": _number(logs["loss"]),
                "train_mean_token_accuracy": _number(logs.get("mean_token_accuracy")),
                **{name: _number(logs[key]) for key, name in GRPO_LOGS.items() if key in logs},
            }
        if "eval_loss" in logs:
            self.last_eval = {
                "valid_loss": _number(logs["eval_loss"]),
                "valid_mean_token_accuracy": _number(logs.get("eval_mean_token_accuracy")),
                **({"eval_reward": _number(logs["eval_reward"])} if "eval_reward" in logs else {}),
            }
        self.observer.on_metrics(
            StepMetrics(
                step=state.global_step,
                total_steps=state.max_steps,
                epoch=float(state.epoch or 0.0),
                train_loss=_number(logs["loss"]) if "loss" in logs else None,
                valid_loss=_number(logs.get("eval_loss")),
                learning_rate=_number(logs.get("learning_rate")),
                tokens_seen=tokens,
                tokens_per_second=speed,
                train_mean_token_accuracy=_number(logs.get("mean_token_accuracy")),
                valid_mean_token_accuracy=_number(logs.get("eval_mean_token_accuracy")),
                **{name: _number(logs.get(key)) for key, name in GRPO_LOGS.items()},
                eval_reward=_number(logs.get("eval_reward")),
            )
        )

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.metrics_csv.flush()
        path = self.checkpoints_dir / f"checkpoint-{state.global_step}"
        self.observer.on_checkpoint(
            state.global_step, path, {"step": state.global_step, **self.last_train, **self.last_eval}
        )

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.metrics_csv.flush()

    @property
    def final_metrics(self) -> dict[str, Any]:
        return {**self.last_train, **self.last_eval}


class EvaluationCallback(TrainerCallback):
    """Answers the validation items (tuneforge/training/evaluation.py) with the starting model
    before the first step, at every checkpoint and at the end. Added before the observer's
    callback, so a checkpoint's answers are on disk before the checkpoint is reported."""

    def __init__(
        self,
        spec: EvaluationSpec,
        valid_file: Path,
        out_dir: Path,
        tokenizer: Any,
        *,
        adapter_type: str,
        resume_from: Path | None,
        observer: ObserverCallback,
    ) -> None:
        self.spec = spec
        self.items = evaluation.read_items(valid_file, spec.max_samples)
        self.out_dir = out_dir
        self.tokenizer = tokenizer
        self.adapter_type = adapter_type
        self.resume_from = resume_from
        self.observer = observer

    def _answer(self, model: Any, step: int | None) -> Path:
        path = evaluation.answers_path(self.out_dir, step)
        evaluation.write_answers(
            path,
            self.items,
            evaluation.generate_answers(model, self.tokenizer, self.items, self.spec.max_new_tokens),
        )
        return path

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not self.spec.compare_base or not self.items or not state.is_world_process_zero:
            return
        base = evaluation.answers_path(self.out_dir, None)
        if self.resume_from is not None:  # the first attempt answered with the starting model
            kept = self.resume_from / evaluation.CHECKPOINT_BASE_ANSWERS
            if kept.is_file():
                base.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(kept, base)
            return
        model = kwargs["model"]
        # LoRA, DoRA and IA3 start as the identity, full and continued runs as the starting weights;
        # fresh virtual tokens are not the base, so prefix and prompt tuning switch them off.
        if self.adapter_type in PROMPT_LEARNING_ADAPTERS:
            with model.disable_adapter():
                self._answer(model, None)
        else:
            self._answer(model, None)

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not self.items or not state.is_world_process_zero:
            return
        self._answer(kwargs["model"], state.global_step)
        base = evaluation.answers_path(self.out_dir, None)
        checkpoint = Path(str(args.output_dir)) / f"checkpoint-{state.global_step}"
        if base.is_file() and checkpoint.is_dir():
            shutil.copyfile(base, checkpoint / evaluation.CHECKPOINT_BASE_ANSWERS)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not self.items or not state.is_world_process_zero or self.observer.stopped is not None:
            return
        if not evaluation.answers_path(self.out_dir, state.global_step).is_file():
            self._answer(kwargs["model"], state.global_step)
