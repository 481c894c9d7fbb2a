"""The worker's entry point: `run_training(spec, paths, observer) -> RunResult`.

Called in a fresh child process (CUDA must not be initialised in a parent that forks). Turns the
job spec and local paths into the method's recipe config and runs that recipe. Importing this
module does not import torch; running it does.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from tuneforge.models.spec import JobSpec
from tuneforge.training import distributed
from tuneforge.training.gguf import gguf_outtype
from tuneforge.training.interface import RunObserver, RunPaths, RunResult

if TYPE_CHECKING:
    from tuneforge.training.common import Finished, RecipeConfig


def recipe_config(spec: JobSpec, paths: RunPaths, *, gradient_checkpointing: bool = False) -> RecipeConfig:
    """The typed config of the recipe that `spec.method.type` names; `gradient_checkpointing`
    turns it on whatever the model and device (the worker's out-of-memory retry asks for it)."""
    from tuneforge.config import get_settings

    common: dict[str, Any] = {
        "model_dir": paths.model_dir,
        "model_id": paths.model_id or spec.model,
        "train_file": paths.train_file,
        "valid_file": paths.valid_file,
        "out_dir": paths.out_dir,
        "resume_from": paths.resume_from,
        "source_adapter": paths.source_adapter,
        "source_state": paths.source_state,
        "adapter": spec.adapter,
        "hyperparameters": spec.hyperparameters,
        "seed": spec.seed,
        "export_merged": "merged" in spec.export,
        "export_gguf": gguf_outtype(spec.export),
        "trust_remote_code": get_settings().trust_remote_code,
        "evaluation": spec.evaluation,
        "gradient_checkpointing": gradient_checkpointing,
        "integrations": list(spec.integrations or []),
    }
    method = spec.method.type
    if method == "supervised":
        from tuneforge.training.supervised import SupervisedConfig

        return SupervisedConfig(**common)
    if method == "dpo":
        from tuneforge.training.dpo import DpoConfig

        return DpoConfig(**common, loss_type=getattr(spec.hyperparameters, "loss_type", "sigmoid"))
    if method == "pretraining":
        from tuneforge.training.pretraining import PretrainingConfig

        return PretrainingConfig(**common)
    if method in ("orpo", "simpo", "kto"):
        from tuneforge.training.preference import PreferenceConfig

        return PreferenceConfig(**common, method=method)
    if method == "reward_model":
        from tuneforge.training.reward import RewardConfig

        return RewardConfig(**common)
    if method == "reinforcement":
        from tuneforge.graders.run import GraderRuntime
        from tuneforge.training.grpo import GrpoConfig

        section = spec.method.reinforcement
        assert section is not None
        runtime = GraderRuntime.from_settings(get_settings())
        return GrpoConfig(**common, grader=section.grader, grader_runtime=runtime)
    raise ValueError(f"method.type {method!r} is not supported")


def run_recipe(
    spec: JobSpec,
    paths: RunPaths,
    observer: RunObserver | None = None,
    *,
    gradient_checkpointing: bool = False,
) -> Finished:
    """Like run_training, but also hands back the trained model and tokenizer (tests, notebooks)."""
    from tuneforge.training import dpo, pretraining, supervised

    cfg = recipe_config(spec, paths, gradient_checkpointing=gradient_checkpointing)
    if isinstance(cfg, supervised.SupervisedConfig):
        return supervised.train(cfg, observer)
    if isinstance(cfg, dpo.DpoConfig):
        return dpo.train(cfg, observer)
    if type(cfg).__name__ in ("PreferenceConfig", "RewardConfig"):  # issue 9's methods
        from tuneforge.training import preference, reward

        if isinstance(cfg, preference.PreferenceConfig):
            return preference.train(cfg, observer)
        assert isinstance(cfg, reward.RewardConfig)
        return reward.train(cfg, observer)
    if type(cfg).__name__ == "GrpoConfig":  # reinforcement fine-tuning
        from tuneforge.training import grpo

        assert isinstance(cfg, grpo.GrpoConfig)
        return grpo.train(cfg, observer)
    assert isinstance(cfg, pretraining.PretrainingConfig)
    return pretraining.train(cfg, observer)


def run_training(
    spec: JobSpec,
    paths: RunPaths,
    observer: RunObserver | None = None,
    *,
    gradient_checkpointing: bool = False,
) -> RunResult:
    """Trains `spec` on `paths`, telling `observer` about progress; see tuneforge.training.interface.

    Raises `tuneforge.training.data.DataError` (a ValueError) for data that cannot train, with the
    file and line in the message, and ValueError for a spec the recipe cannot run.
    """
    if distributed.world_size() > 1:  # one rank of a multi-device run (tuneforge.training.distributed)
        run = distributed.configure(spec)
        observer = distributed.RankObserver(observer, run)
        if distributed.rank() != 0:  # rank 0 alone writes the run's outputs and checkpoints
            paths = dataclasses.replace(paths, out_dir=paths.out_dir.with_name(f"rank-{distributed.rank()}"))
    return run_recipe(spec, paths, observer, gradient_checkpointing=gradient_checkpointing).result
