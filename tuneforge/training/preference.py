"""Preference methods beyond DPO, each with TRL's trainer for it:

- `orpo`: odds-ratio preference optimisation (trl.experimental.orpo): an SFT loss on the chosen
  answer plus a log-odds term against the rejected one; no reference model, no SFT stage first.
- `simpo`: SimPO, TRL's CPO trainer with `loss_type="simpo"` (trl.experimental.cpo): the
  length-normalised log-probability is the implicit reward, with a target margin `gamma`; no
  reference model. `cpo_alpha` > 0 adds CPO's behaviour-cloning term.
- `kto`: Kahneman-Tversky optimisation (trl.KTOTrainer) on unpaired feedback lines, each a prompt,
  one completion and `label` (true: desirable); adapter runs use the base with the adapter off as
  the reference, full runs a frozen copy of the base.

Pairs are read as DPO reads them (tuneforge.training.data); KTO lines here. Reads top to bottom:
load, set up, train, save (tuneforge.training.common.train_and_save)."""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneforge.models.spec import (
    Hyperparameters,
    KtoHyperparameters,
    OrpoHyperparameters,
    SimpoHyperparameters,
)
from tuneforge.training.common import (
    Finished,
    RecipeConfig,
    RecipeRun,
    keep_adapter_in_float32_on_cpu,
    runtime_arguments,
    train_and_save,
)
from tuneforge.training.hyperparams import EffectiveHyperparameters, resolve, trainer_arguments
from tuneforge.training.interface import RunObserver
from tuneforge.training.loading import (
    Device,
    detect_device,
    load_model,
    load_tokenizer,
    take_over_optimizer_state,
    trainable_model,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from tuneforge.training.data import TrainingData

#: "auto" beta of each method (TRL's defaults; SimPO's from the paper's range, 2.0-2.5).
DEFAULT_BETAS = {"orpo": 0.1, "simpo": 2.0, "kto": 0.1}


@dataclass
class PreferenceConfig(RecipeConfig):
    """An ORPO, SimPO or KTO run."""

    method: str = field(default="orpo", metadata={"help": "orpo, simpo or kto."})
    hyperparameters: Hyperparameters = field(
        default_factory=OrpoHyperparameters,
        metadata={"help": "The method's hyperparameters (beta and its own knobs included)."},
    )


def effective_hyperparameters(
    cfg: RecipeConfig, method: str, n_examples: int, has_validation: bool
) -> EffectiveHyperparameters:
    """The resolved hyperparameters: DPO's learning rates (a preference method moves a policy as
    gently as DPO does; the reward model trains like supervised), the method's auto beta."""
    hp_in = cfg.hyperparameters
    hp = resolve(
        hp_in,
        method="supervised" if method == "reward_model" else "dpo",
        adapter=cfg.adapter.type,
        n_examples=n_examples,
        packing=False,
        has_validation=has_validation,
    )
    beta = getattr(hp_in, "beta", None)
    if beta is None:
        return dataclasses.replace(hp, beta=None)
    return dataclasses.replace(hp, beta=DEFAULT_BETAS[method] if beta == "auto" else float(beta))


def read_feedback_file(
    path: Path, tokenizer: PreTrainedTokenizerBase, max_seq_length: int, *, split: str = "train"
) -> TrainingData:
    """Reads unpaired feedback (KTO) lines into TRL's unpaired preference rows
    `{"prompt", "completion", "label"}`; chat lines split at their last assistant message."""
    from tuneforge.training import data as reader
    from tuneforge.training.formats import DataFormat

    fmt, records = reader.read_records(path, "kto")
    warnings: Counter[str] = Counter()
    if fmt is DataFormat.KTO_CHAT and reader.ensure_chat_template(tokenizer):
        warnings["chat_template_missing_used_chatml"] += 1
    stats = reader.DataStats(format=fmt.value)
    lengths: list[int] = []
    rows: list[dict[str, Any]] = []
    for record in records:
        prompt: Any
        completion: Any
        if fmt is DataFormat.KTO_CHAT:
            messages = reader._as_messages(record["messages"], "user")
            last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
            if last <= 0:
                warnings["examples_without_prompt_or_answer"] += 1
                continue
            prompt, completion = messages[:last], [messages[last]]
        else:
            prompt, completion = record["prompt"], record["completion"]
        n_tokens, trained = reader._pair_length(tokenizer, prompt, completion)
        if n_tokens > max_seq_length:
            warnings["truncated_examples"] += 1
        stats.trained_tokens += trained
        lengths.append(n_tokens)
        rows.append({"prompt": prompt, "completion": completion, "label": bool(record["label"])})
    if not rows:
        raise reader.DataError(f"{path.name}: no {split} example has anything to train on")
    if len({row["label"] for row in rows}) < 2 and split == "train":
        warnings["feedback_of_one_label_only"] += 1
    reader._record_lengths(stats, lengths)
    return reader.TrainingData(kind="unpaired_preference", rows=rows, stats=stats, warnings=+warnings)


def _read(
    cfg: PreferenceConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[TrainingData, TrainingData | None]:
    from tuneforge.training.data import read_training_file

    max_len = cfg.hyperparameters.max_seq_length
    reader = "kto" if cfg.method == "kto" else "dpo"  # pairs share DPO's reading (and its cache entries)
    train = read_training_file(cfg.train_file, reader, tokenizer, max_len)
    valid = (
        read_training_file(cfg.valid_file, reader, tokenizer, max_len, split="validation")
        if cfg.valid_file
        else None
    )
    return train, valid


def _trainer(
    cfg: PreferenceConfig,
    device: Device,
    model: Any,
    new_adapter: Any,
    tokenizer: PreTrainedTokenizerBase,
    hp: EffectiveHyperparameters,
    train_data: TrainingData,
    valid_data: TrainingData | None,
) -> Any:
    common_args = {
        **runtime_arguments(cfg, device, model),
        **trainer_arguments(hp, has_validation=valid_data is not None),
    }
    inputs: dict[str, Any] = {
        "model": model,
        "train_dataset": train_data.dataset(),
        "eval_dataset": valid_data.dataset() if valid_data else None,
        "processing_class": tokenizer,
        "peft_config": new_adapter,
    }
    hp_in = cfg.hyperparameters
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # ORPO and CPO live in trl.experimental
    if cfg.method == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ORPOTrainer(args=ORPOConfig(**common_args), **inputs)
    if cfg.method == "simpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        assert isinstance(hp_in, SimpoHyperparameters)
        args = CPOConfig(**common_args, loss_type="simpo", simpo_gamma=hp_in.gamma, cpo_alpha=hp_in.cpo_alpha)
        return CPOTrainer(args=args, **inputs)
    if cfg.method == "kto":
        from trl import KTOConfig, KTOTrainer

        assert isinstance(hp_in, KtoHyperparameters)
        if common_args["per_device_train_batch_size"] < 2:
            # KTO's KL estimate pairs each prompt with another line's completion in the same batch.
            raise ValueError("kto needs batch_size of at least 2 (its KL term mixes lines within a batch)")
        reference = None
        if cfg.adapter.type == "full":
            reference = load_model(cfg.model_dir, device, trust_remote_code=cfg.trust_remote_code)
            reference.requires_grad_(False).eval()
        kto_args = KTOConfig(
            **common_args,
            desirable_weight=hp_in.desirable_weight,
            undesirable_weight=hp_in.undesirable_weight,
        )
        return KTOTrainer(ref_model=reference, args=kto_args, **inputs)
    raise ValueError(f"method.type {cfg.method!r} is not a preference method of this recipe")


def train(cfg: PreferenceConfig, observer: RunObserver | None = None) -> Finished:
    # Load
    tokenizer = load_tokenizer(cfg.model_dir)
    train_data, valid_data = _read(cfg, tokenizer)
    device = detect_device()
    model = load_model(cfg.model_dir, device, cfg.adapter, trust_remote_code=cfg.trust_remote_code)
    # A continued job trains its parent's adapter (for KTO, TRL keeps a frozen "ref" copy of it).
    model, new_adapter = trainable_model(model, cfg.adapter, cfg.source_adapter)

    # Set up
    hp = effective_hyperparameters(cfg, cfg.method, train_data.stats.examples, valid_data is not None)
    trainer = _trainer(cfg, device, model, new_adapter, tokenizer, hp, train_data, valid_data)
    keep_adapter_in_float32_on_cpu(trainer, device)
    take_over_optimizer_state(trainer, cfg.source_state, resuming=cfg.resume_from is not None)

    # Train, save
    return train_and_save(
        trainer,
        cfg,
        observer,
        RecipeRun(
            method=cfg.method,
            tokenizer=tokenizer,
            device=device,
            hp=hp,
            train_data=train_data,
            valid_data=valid_data,
            batching="padded",
        ),
    )
