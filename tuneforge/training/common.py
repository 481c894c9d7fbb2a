"""What every recipe shares: its config's common fields, the runtime trainer arguments, and the
train-then-save tail (observer callback, checkpoints, outputs, RunResult)."""

from __future__ import annotations

import random
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneforge.models.spec import AdapterSpec, EvaluationSpec, Hyperparameters
from tuneforge.training.callbacks import EvaluationCallback, MetricsCsv, NullObserver, ObserverCallback
from tuneforge.training.data import TrainingData
from tuneforge.training.hyperparams import RULES, EffectiveHyperparameters
from tuneforge.training.interface import RunObserver, RunResult
from tuneforge.training.loading import Device, parameter_counts, use_gradient_checkpointing
from tuneforge.training.outputs import (
    MERGEABLE,
    model_card,
    name_base_model,
    save_adapter,
    save_full_model,
    save_merged,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer

    from tuneforge.models.spec import Integration
    from tuneforge.training.integrations import TrackingCallback


@dataclass
class RecipeConfig:
    """Fields every recipe takes. Built from a JobSpec and RunPaths by `tuneforge.training.run`."""

    model_dir: Path = field(metadata={"help": "Local directory of the base model."})
    model_id: str = field(metadata={"help": "The base model's id, recorded in saved configs and cards."})
    train_file: Path = field(metadata={"help": "Training data, JSONL."})
    out_dir: Path = field(
        metadata={"help": "Where checkpoints/, adapter/, model/, merged/ and metrics.csv go."}
    )
    valid_file: Path | None = field(default=None, metadata={"help": "Optional validation data, JSONL."})
    resume_from: Path | None = field(
        default=None, metadata={"help": "A checkpoint directory written by an earlier run of this job."}
    )
    source_adapter: Path | None = field(
        default=None,
        metadata={"help": "A continued job's parent PEFT adapter: trained on instead of a fresh one."},
    )
    source_state: Path | None = field(
        default=None,
        metadata={"help": "A checkpoint whose optimizer and scheduler state the run starts with."},
    )
    adapter: AdapterSpec = field(default_factory=AdapterSpec, metadata={"help": "Which parameters train."})
    hyperparameters: Hyperparameters = field(
        default_factory=Hyperparameters, metadata={"help": "As the job gave them; 'auto' resolved here."}
    )
    seed: int | None = field(default=None, metadata={"help": "Random seed; None draws one and reports it."})
    export_merged: bool = field(
        default=False, metadata={"help": "Also save the adapter merged into the base."}
    )
    export_gguf: str | None = field(
        default=None,
        metadata={"help": "Also convert the merged model to GGUF with this outtype (f16, q8_0)."},
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow model code shipped with the model."}
    )
    evaluation: EvaluationSpec | None = field(
        default=None,
        metadata={"help": "Answer the validation items at each checkpoint and at the end, for grading."},
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Recompute activations whatever the model and device (out-of-memory retries)."},
    )
    integrations: list[Integration] = field(
        default_factory=list,
        metadata={"help": "Experiment trackers to log to (tuneforge.training.integrations)."},
    )

    def effective_seed(self) -> int:
        if self.seed is None:
            self.seed = random.SystemRandom().randrange(2**31 - 1)
        return self.seed

    @property
    def checkpoints_dir(self) -> Path:
        return self.out_dir / "checkpoints"


@dataclass
class Finished:
    """A recipe's outcome: the RunResult for the worker, and the trained model for tests and tools."""

    result: RunResult
    model: Any
    tokenizer: Any


def runtime_arguments(cfg: RecipeConfig, device: Device, model: PreTrainedModel) -> dict[str, Any]:
    """Trainer arguments that come from the machine and the service, not from the job."""
    return {
        "output_dir": str(cfg.checkpoints_dir),
        "seed": cfg.effective_seed(),
        "data_seed": cfg.effective_seed(),
        "use_cpu": not device.cuda,
        "bf16": device.cuda and device.dtype_name == "bfloat16",
        "fp16": False,
        "gradient_checkpointing": cfg.gradient_checkpointing or use_gradient_checkpointing(model, device),
        "logging_strategy": "steps",
        "logging_steps": 1,
        "logging_first_step": True,
        "report_to": "none",
        "disable_tqdm": True,
        "save_only_model": False,
        "dataloader_num_workers": 0,
        "include_num_input_tokens_seen": "non_padding",
        "trust_remote_code": cfg.trust_remote_code,
    }


def keep_adapter_in_float32_on_cpu(trainer: Trainer, device: Device) -> None:
    """TRL casts QLoRA adapter weights to bfloat16 (the paper's recipe for GPUs). On CPU the compute
    dtype is float32 and bf16 matmuls are slow and lossy, so the trainable weights go back to float32."""
    if device.cuda:
        return
    import torch

    model: Any = trainer.model
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def _last_checkpoint(checkpoints_dir: Path) -> Path | None:
    found = [p for p in checkpoints_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return max(found, key=lambda p: int(p.name.split("-")[-1])) if found else None


@dataclass(frozen=True)
class RecipeRun:
    """What a recipe hands to `train_and_save` besides its trainer: the method's name, the
    tokenizer and device it set up, the effective hyperparameters, the data, and how batches
    are formed (reported with the hyperparameters)."""

    method: str
    tokenizer: PreTrainedTokenizerBase
    device: Device
    hp: EffectiveHyperparameters
    train_data: TrainingData
    valid_data: TrainingData | None
    batching: str


@dataclass
class _Report:
    """What the run reports besides its metrics, gathered before training starts."""

    trainable: int
    total: int
    warnings: Counter[str]
    hyperparameters: dict[str, Any]
    data: dict[str, Any]


def train_and_save(
    trainer: Trainer, cfg: RecipeConfig, observer: RunObserver | None, run: RecipeRun
) -> Finished:
    """Trains (resuming if asked), then writes adapter/model/merged, the card and the RunResult."""
    report = _prepare(trainer, cfg, run)
    callback = _attach_callbacks(trainer, cfg, observer, run, report)
    tracking = _start_tracking(trainer, cfg, observer, run, report)
    try:
        output = trainer.train(resume_from_checkpoint=str(cfg.resume_from) if cfg.resume_from else None)
    except BaseException:
        if tracking is not None:
            tracking.finish(None)
        raise
    metrics = _final_metrics(trainer, run, callback, output.metrics)
    result = _run_result(trainer, cfg, run, report, callback, metrics)
    if callback.stopped is None:
        _save_outputs(trainer, cfg, run, report, result)
    if tracking is not None:
        tracking.finish(result if callback.stopped is None else None)
    return Finished(result, trainer.model, run.tokenizer)


def _start_tracking(
    trainer: Trainer, cfg: RecipeConfig, observer: RunObserver | None, run: RecipeRun, report: _Report
) -> TrackingCallback | None:
    """The job's experiment trackers, started and fed from the Trainer's logs (after the observer
    callback, which checks each step's numbers first). A tracker's failure is a notice to the
    observer (an event), never the run's failure."""
    from tuneforge.training.integrations import run_params, start_tracking

    params = run_params(run.method, cfg.model_id, cfg.adapter.model_dump(mode="json"), report.hyperparameters)
    tracking = start_tracking(cfg.integrations, cfg.out_dir, params, getattr(observer, "on_notice", None))
    if tracking is not None:
        trainer.add_callback(tracking)
    return tracking


def _prepare(trainer: Trainer, cfg: RecipeConfig, run: RecipeRun) -> _Report:
    """Quiets the trainer's printing, names the base model in saved configs, and gathers the
    parameter counts, data warnings and effective hyperparameters."""
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    model: Any = trainer.model
    # Checkpoints record the model id; PEFT then warns it cannot read a config there (harmless).
    warnings.filterwarnings("ignore", message="Could not find a config file in")
    name_base_model(model, cfg.model_id)
    trainable, total = parameter_counts(model)
    counted: Counter[str] = Counter(run.train_data.warnings)
    data = {"train": run.train_data.stats.as_dict()}
    if run.valid_data is not None:
        counted.update({f"validation_{k}": v for k, v in run.valid_data.warnings.items()})
        data["validation"] = run.valid_data.stats.as_dict()
    if cfg.hyperparameters.early_stopping_patience is not None and run.valid_data is None:
        counted["early_stopping_without_validation_file"] += 1
    effective = {**run.hp.as_dict(), "seed": cfg.effective_seed(), "batching": run.batching}
    return _Report(trainable, total, counted, effective, data)


def _attach_callbacks(
    trainer: Trainer, cfg: RecipeConfig, observer: RunObserver | None, run: RecipeRun, report: _Report
) -> ObserverCallback:
    """The observer bridge (with the metrics CSV) and early stopping when asked."""
    from transformers import EarlyStoppingCallback

    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    callback = ObserverCallback(
        observer or NullObserver(),
        MetricsCsv(cfg.out_dir / "metrics.csv"),
        num_examples=run.train_data.stats.examples,
        hyperparameters=report.hyperparameters,
        trainable_params=report.trainable,
        total_params=report.total,
        checkpoints_dir=cfg.checkpoints_dir,
    )
    if cfg.evaluation is not None and cfg.valid_file is not None:  # first: answers before the report
        trainer.add_callback(
            EvaluationCallback(
                cfg.evaluation,
                cfg.valid_file,
                cfg.out_dir,
                run.tokenizer,
                adapter_type=cfg.adapter.type,
                resume_from=cfg.resume_from,
                observer=callback,
            )
        )
    trainer.add_callback(callback)
    if run.hp.early_stopping_patience is not None:
        trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=run.hp.early_stopping_patience))
    return callback


def _final_metrics(
    trainer: Trainer, run: RecipeRun, callback: ObserverCallback, train_metrics: dict[str, Any]
) -> dict[str, Any]:
    """The last logged metrics, OpenAI's full_valid_* (the whole validation file on the final
    weights, evaluated now if the last evaluation was earlier) and the mean training loss."""
    state = trainer.state
    complete = run.valid_data is not None and callback.stopped is None
    if complete:
        evaluated_at = [e["step"] for e in state.log_history if "eval_loss" in e]
        if not evaluated_at or evaluated_at[-1] != state.global_step:
            trainer.evaluate()
    metrics = {"step": state.global_step, **callback.final_metrics}
    if complete:
        metrics["full_valid_loss"] = metrics.get("valid_loss")
        metrics["full_valid_mean_token_accuracy"] = metrics.get("valid_mean_token_accuracy")
    if "train_loss" in train_metrics and state.global_step > callback.start_step:
        metrics["mean_train_loss"] = train_metrics["train_loss"]
    return metrics


def _run_result(
    trainer: Trainer,
    cfg: RecipeConfig,
    run: RecipeRun,
    report: _Report,
    callback: ObserverCallback,
    metrics: dict[str, Any],
) -> RunResult:
    state = trainer.state
    device = run.device
    return RunResult(
        stopped=callback.stopped,
        final_step=state.global_step,
        total_steps=state.max_steps,
        trained_tokens=int(state.num_input_tokens_seen or 0),
        metrics=metrics,
        metrics_csv=callback.metrics_csv.path,
        last_checkpoint=_last_checkpoint(cfg.checkpoints_dir),
        trainable_params=report.trainable,
        total_params=report.total,
        warnings=dict(report.warnings),
        report={
            "method": run.method,
            "model": cfg.model_id,
            "adapter": cfg.adapter.model_dump(mode="json"),
            "hyperparameters": report.hyperparameters,
            "rules": RULES,
            "data": report.data,
            "warnings": dict(report.warnings),
            "device": {
                "cuda": device.cuda,
                "dtype": device.dtype_name,
                "attention": device.attn_implementation,
            },
            "start_step": callback.start_step,
        },
    )


def _save_outputs(
    trainer: Trainer, cfg: RecipeConfig, run: RecipeRun, report: _Report, result: RunResult
) -> None:
    """Writes the trained adapter (or full model), merged when asked, each with its model card,
    and records their directories in `result`."""
    model: Any = trainer.model

    def card(kind: str) -> str:
        return model_card(
            model_id=cfg.model_id,
            method=run.method,
            adapter=cfg.adapter.model_dump(mode="json"),
            hyperparameters=report.hyperparameters,
            data=report.data,
            metrics=result.metrics,
            warnings=dict(report.warnings),
            trainable_params=report.trainable,
            total_params=report.total,
            kind=kind,
        )

    if cfg.adapter.type == "full":
        result.model_dir = save_full_model(
            model, run.tokenizer, cfg.out_dir / "model", cfg.model_id, card("model")
        )
        _save_gguf(cfg, result.model_dir, result)
        return
    result.adapter_dir = save_adapter(
        model, run.tokenizer, cfg.out_dir / "adapter", cfg.model_id, card("adapter")
    )
    if not cfg.export_merged and cfg.export_gguf is None:
        return
    if cfg.adapter.type in MERGEABLE:
        merged = save_merged(
            result.adapter_dir,
            cfg.model_dir,
            run.tokenizer,
            cfg.out_dir / "merged",
            card("merged"),
            run.device,
        )
        result.merged_dir = merged if cfg.export_merged else None
        _save_gguf(cfg, merged, result)
    else:
        result.warnings["merge_not_supported_for_adapter"] = 1
        result.report["warnings"] = result.warnings


def _save_gguf(cfg: RecipeConfig, model_dir: Path, result: RunResult) -> None:
    """The merged (or full) model in GGUF with its Ollama Modelfile, when the job asked."""
    if cfg.export_gguf is None:
        return
    from tuneforge.training.gguf import export_gguf

    exported = export_gguf(model_dir, cfg.out_dir / "gguf", cfg.export_gguf, cfg.model_id)
    result.gguf_dir = exported.directory
    if exported.warnings:
        result.warnings.update(exported.warnings)
        result.report["warnings"] = result.warnings
