"""Supervised fine-tuning with TRL's SFTTrainer: chat data trains on assistant turns only, prompt/
completion data on completions only. Reads top to bottom: load, set up, train, save."""

from __future__ import annotations

from dataclasses import dataclass, field

from tuneforge.training import distributed, tokcache
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
    assistant_only_loss_available,
    choose_packing,
    detect_device,
    load_model,
    load_tokenizer,
    take_over_optimizer_state,
    trainable_model,
)


@dataclass
class SupervisedConfig(RecipeConfig):
    """A supervised run. `packing=None` in the hyperparameters chooses the batching by device."""

    assistant_only_loss: bool = field(
        default=True, metadata={"help": "Chat data: train on assistant turns only (weight 0 turns excluded)."}
    )
    completion_only_loss: bool = field(
        default=True, metadata={"help": "Prompt/completion data: train on the completion only."}
    )


def train(cfg: SupervisedConfig, observer: RunObserver | None = None) -> Finished:
    from trl import SFTConfig, SFTTrainer

    # Load
    hp_in = cfg.hyperparameters
    tokenizer = load_tokenizer(cfg.model_dir)
    train_data = read_training_file(cfg.train_file, "supervised", tokenizer, hp_in.max_seq_length)
    valid_data = (
        read_training_file(cfg.valid_file, "supervised", tokenizer, hp_in.max_seq_length, split="validation")
        if cfg.valid_file
        else None
    )
    device = detect_device()
    model = load_model(cfg.model_dir, device, cfg.adapter, trust_remote_code=cfg.trust_remote_code)
    model, new_adapter = trainable_model(model, cfg.adapter, cfg.source_adapter)

    # Set up
    assistant_only = cfg.assistant_only_loss and train_data.kind == "conversational"
    if assistant_only and not assistant_only_loss_available(tokenizer):
        # A template TRL cannot mark: train on whole conversations rather than refuse the job.
        assistant_only = False
        train_data.warnings["assistant_only_loss_unavailable"] += 1
    packing = choose_packing(hp_in.packing, "supervised", device)
    hp = resolve(
        hp_in,
        method="supervised",
        adapter=cfg.adapter.type,
        n_examples=train_data.stats.examples,
        packing=packing,
        has_validation=valid_data is not None,
    )
    # Padding-free packing for flash attention; otherwise length-grouped padded batches.
    batching = "packing" if packing else "group_by_length"
    args = SFTConfig(
        **runtime_arguments(cfg, device, model),
        **trainer_arguments(hp, has_validation=valid_data is not None),
        packing=packing,
        packing_strategy="bfd",
        train_sampling_strategy="random" if packing else "group_by_length",
        assistant_only_loss=assistant_only,
        completion_only_loss=cfg.completion_only_loss if train_data.kind == "prompt_completion" else None,
    )
    trainer = tokcache.sft_trainer(  # TRL's tokenized datasets, from the cache when it has them
        distributed.trainer_class(SFTTrainer),  # CPU fsdp ranks shard the model themselves
        model=model,
        args=args,
        train_data=train_data,
        valid_data=valid_data,
        processing_class=tokenizer,
        peft_config=new_adapter,
    )
    keep_adapter_in_float32_on_cpu(trainer, device)
    take_over_optimizer_state(trainer, cfg.source_state, resuming=cfg.resume_from is not None)

    # Train, save
    return train_and_save(
        trainer,
        cfg,
        observer,
        RecipeRun(
            method="supervised",
            tokenizer=tokenizer,
            device=device,
            hp=hp,
            train_data=train_data,
            valid_data=valid_data,
            batching=batching,
        ),
    )
