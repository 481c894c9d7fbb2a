"""Continued pre-training: causal language modelling on raw text, packed into full rows (TRL's
SFTTrainer on a text dataset; "bfd_split" packing splits long texts instead of cutting them).
Reads top to bottom: load, set up, train, save."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tuneforge.training import tokcache
from tuneforge.training.common import (
    Finished,
    RecipeConfig,
    RecipeRun,
    keep_adapter_in_float32_on_cpu,
    runtime_arguments,
    train_and_save,
)
from tuneforge.training.data import read_training_file
from tuneforge.training.hyperparams import resolve, trainer_arguments
from tuneforge.training.interface import RunObserver
from tuneforge.training.loading import (
    choose_packing,
    detect_device,
    load_model,
    load_tokenizer,
    take_over_optimizer_state,
    trainable_model,
)


@dataclass
class PretrainingConfig(RecipeConfig):
    """A continued pre-training run on `{"text"}` lines."""

    packing_strategy: str = field(
        default="bfd_split",
        metadata={"help": "TRL packing strategy: bfd_split keeps whole texts together and splits long ones."},
    )


def train(cfg: PretrainingConfig, observer: RunObserver | None = None) -> Finished:
    from trl import SFTConfig, SFTTrainer

    # Load
    hp_in = cfg.hyperparameters
    tokenizer = load_tokenizer(cfg.model_dir)
    train_data = read_training_file(cfg.train_file, "pretraining", tokenizer, hp_in.max_seq_length)
    valid_data = (
        read_training_file(cfg.valid_file, "pretraining", tokenizer, hp_in.max_seq_length, split="validation")
        if cfg.valid_file
        else None
    )
    device = detect_device()
    model = load_model(cfg.model_dir, device, cfg.adapter, trust_remote_code=cfg.trust_remote_code)
    model, new_adapter = trainable_model(model, cfg.adapter, cfg.source_adapter)  # a continued job's

    # Set up: the number of packed rows decides the steps, so "auto" sees texts, not rows.
    hp = resolve(
        hp_in,
        method="pretraining",
        adapter=cfg.adapter.type,
        n_examples=train_data.stats.examples,
        packing=choose_packing(hp_in.packing, "pretraining", device),
        has_validation=valid_data is not None,
        n_rows=math.ceil(train_data.stats.tokens / hp_in.max_seq_length),
    )
    args = SFTConfig(
        **runtime_arguments(cfg, device, model),
        **trainer_arguments(hp, has_validation=valid_data is not None),
        packing=True,
        packing_strategy=cfg.packing_strategy,
        dataset_text_field="text",
    )
    trainer = tokcache.sft_trainer(  # TRL's tokenized datasets, from the cache when it has them
        SFTTrainer,
        model=model,
        args=args,
        train_data=train_data,
        valid_data=valid_data,
        processing_class=tokenizer,
        peft_config=new_adapter,
    )
    take_over_optimizer_state(trainer, cfg.source_state, resuming=cfg.resume_from is not None)
    keep_adapter_in_float32_on_cpu(trainer, device)

    # Train, save
    return train_and_save(
        trainer,
        cfg,
        observer,
        RecipeRun(
            method="pretraining",
            tokenizer=tokenizer,
            device=device,
            hp=hp,
            train_data=train_data,
            valid_data=valid_data,
            batching=f"packing ({cfg.packing_strategy})",
        ),
    )
