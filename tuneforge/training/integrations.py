"""A job's `integrations`: the run logged to Weights & Biases, MLflow and TensorBoard.

Each tracker gets the run's parameters at the start, every logged step's metrics (the same
values and names as `metrics.csv`: `train_loss`, `valid_loss`, `learning_rate`, ...) and, at the
end, what the run saved: MLflow stores the adapter (or full model) as an artifact; TensorBoard's
event files become the job's artifact `tensorboard`.

A tracker that fails never fails the job: it stops logging, and the run reports it through the
observer's optional `on_notice(message, data)` (the worker turns that into a job event). The
message names the tracker and the exception's type only; the details (which may name hosts and
paths) go to the training log.

Credentials and places are the service's: W&B uses the worker's WANDB_API_KEY (or WANDB_MODE),
MLflow the administrator's TUNEFORGE_MLFLOW_TRACKING_URI. The heavy packages (`wandb`,
`mlflow-skinny`, `tensorboard`) come with the `tracking` extra and are imported only by a run
that uses them.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from tuneforge.models.spec import Integration, MlflowEntry, TensorboardEntry, WandbEntry

if TYPE_CHECKING:
    from tuneforge.training.interface import RunResult

log = logging.getLogger(__name__)

Notify = Callable[[str, dict[str, Any]], None]

# Trainer log keys -> the metrics.csv column names the trackers use.
LOGGED = {
    "loss": "train_loss",
    "mean_token_accuracy": "train_accuracy",
    "eval_loss": "valid_loss",
    "eval_mean_token_accuracy": "valid_mean_token_accuracy",
    "learning_rate": "learning_rate",
    "grad_norm": "grad_norm",
    "epoch": "epoch",
    "rewards/accuracies": "reward_accuracy",
    "rewards/margins": "reward_margin",
}


def step_metrics(logs: dict[str, Any]) -> dict[str, float]:
    """A Trainer log entry as tracker metrics, finite numbers only."""
    found: dict[str, float] = {}
    for key, name in LOGGED.items():
        value = logs.get(key)
        if isinstance(value, int | float) and math.isfinite(float(value)):
            found[name] = float(value)
    return found


class Tracker:
    """One experiment tracker of one run."""

    kind = ""

    def start(self, params: dict[str, Any]) -> None:
        raise NotImplementedError

    def log(self, step: int, metrics: dict[str, float]) -> None:
        raise NotImplementedError

    def finish(self, result: RunResult | None) -> None:
        """Ends the run; `result` is None when training failed or was stopped."""
        raise NotImplementedError


class WandbTracker(Tracker):
    kind = "wandb"

    def __init__(self, entry: WandbEntry, out_dir: Path) -> None:
        self.entry = entry.wandb
        self.out_dir = out_dir
        self.run: Any = None

    def start(self, params: dict[str, Any]) -> None:
        import wandb

        directory = Path(os.environ.get("WANDB_DIR") or self.out_dir)
        directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=self.entry.project,
            entity=self.entry.entity,
            name=self.entry.name,
            tags=self.entry.tags or None,
            config=params,
            dir=str(directory),
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
        )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def finish(self, result: RunResult | None) -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if result is not None else 1)


class MlflowTracker(Tracker):
    kind = "mlflow"

    def __init__(self, entry: MlflowEntry, tracking_uri: str) -> None:
        self.entry = entry.mlflow
        self.tracking_uri = tracking_uri
        self.client: Any = None
        self.run_id = ""

    def start(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        experiment = self.client.get_experiment_by_name(self.entry.experiment)
        if experiment is None:
            try:
                experiment_id = self.client.create_experiment(self.entry.experiment)
            except Exception:  # another job created it meanwhile
                experiment = self.client.get_experiment_by_name(self.entry.experiment)
                if experiment is None:
                    raise
                experiment_id = experiment.experiment_id
        else:
            experiment_id = experiment.experiment_id
        run = self.client.create_run(experiment_id, run_name=self.entry.run_name, tags=dict(self.entry.tags))
        self.run_id = run.info.run_id
        self.client.log_batch(
            self.run_id, params=[Param(key, str(value)[:6000]) for key, value in sorted(params.items())]
        )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[Metric(key, value, now, step) for key, value in metrics.items()]
        )

    def finish(self, result: RunResult | None) -> None:
        if self.client is None or not self.run_id:
            return
        if result is not None:
            for name, saved in (("adapter", result.adapter_dir), ("model", result.model_dir)):
                if saved is not None:
                    self.client.log_artifacts(self.run_id, str(saved), artifact_path=name)
        self.client.set_terminated(self.run_id, "FINISHED" if result is not None else "FAILED")


class TensorboardTracker(Tracker):
    kind = "tensorboard"

    def __init__(self, entry: TensorboardEntry, out_dir: Path) -> None:
        self.directory = out_dir / "tensorboard"
        self.writer: Any = None

    def start(self, params: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.directory))
        table = "\n".join(f"| {key} | {value} |" for key, value in sorted(params.items()))
        self.writer.add_text("parameters", "| name | value |\n| --- | --- |\n" + table, 0)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def finish(self, result: RunResult | None) -> None:
        if self.writer is None:
            return
        self.writer.close()
        if result is not None:
            result.tensorboard_dir = self.directory


class TrackingCallback(TrainerCallback):
    """Feeds the run's trackers from the Trainer's logs; a tracker that raises is dropped and
    reported once (`notify`), and training goes on."""

    def __init__(self, trackers: list[Tracker], notify: Notify | None) -> None:
        self.trackers = trackers
        self.notify = notify

    def _guarded(self, tracker: Tracker, what: str, call: Callable[[], None], step: int | None) -> None:
        try:
            call()
        except Exception as error:
            self.trackers = [t for t in self.trackers if t is not tracker]
            log.warning("integration %s failed while %s", tracker.kind, what, exc_info=True)
            at = f" at step {step}" if step is not None else ""
            message = (
                f"The {tracker.kind} integration failed while {what}{at} ({type(error).__name__}) and "
                "logs nothing more for this run; training goes on."
            )
            if self.notify is not None:
                self.notify(message, {"integration": tracker.kind, "step": step})

    def start(self, params: dict[str, Any]) -> None:
        for tracker in list(self.trackers):
            self._guarded(tracker, "starting", lambda t=tracker: t.start(params), None)  # type: ignore[misc]

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
        metrics = step_metrics(logs)
        if state.num_input_tokens_seen:
            metrics["tokens_seen"] = float(state.num_input_tokens_seen)
        step = state.global_step
        for tracker in list(self.trackers):
            self._guarded(tracker, "logging", lambda t=tracker: t.log(step, metrics), step)  # type: ignore[misc]

    def finish(self, result: RunResult | None) -> None:
        """Ends every run: with the saved outputs when `result` is given, as failed otherwise."""
        for tracker in list(self.trackers):
            self._guarded(tracker, "finishing", lambda t=tracker: t.finish(result), None)  # type: ignore[misc]
        self.trackers = []


def make_trackers(
    integrations: list[Integration], out_dir: Path, mlflow_tracking_uri: str | None
) -> list[Tracker]:
    """The trackers a job's integrations name (the API refused those the service has not
    configured; one whose setting is gone since is skipped with a warning)."""
    trackers: list[Tracker] = []
    for entry in integrations:
        if isinstance(entry, WandbEntry):
            trackers.append(WandbTracker(entry, out_dir))
        elif isinstance(entry, MlflowEntry):
            if mlflow_tracking_uri:
                trackers.append(MlflowTracker(entry, mlflow_tracking_uri))
            else:
                log.warning("mlflow integration skipped: TUNEFORGE_MLFLOW_TRACKING_URI is not set here")
        elif isinstance(entry, TensorboardEntry):
            trackers.append(TensorboardTracker(entry, out_dir))
    return trackers


def start_tracking(
    integrations: list[Integration] | None, out_dir: Path, params: dict[str, Any], notify: Notify | None
) -> TrackingCallback | None:
    """The callback that logs this run to its trackers, started; None without integrations."""
    if not integrations:
        return None
    from tuneforge.config import get_settings

    callback = TrackingCallback(
        make_trackers(integrations, out_dir, get_settings().mlflow_tracking_uri), notify
    )
    callback.start(params)
    return callback


def run_params(
    method: str, model_id: str, adapter: dict[str, Any], hyperparameters: dict[str, Any]
) -> dict[str, Any]:
    """What a run logs as parameters: method, base model, adapter and effective hyperparameters."""
    params: dict[str, Any] = {"method": method, "model": model_id}
    params.update({f"adapter.{key}": value for key, value in adapter.items()})
    params.update(hyperparameters)
    return params
