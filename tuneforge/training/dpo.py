"""Direct preference optimisation with TRL's DPOTrainer. Adapter runs use the base with the adapter
switched off as the reference (`ref_model=None`); full runs an explicit frozen copy of the base
(for a continued job, of its parent's weights). A job continued from a fine-tuned adapter trains
that adapter against a frozen copy of it, TRL's "ref" adapter.
Reads top to bottom: load, set up, train, save."""

from __future__ import annotations

from dataclasses import dataclass, field

from tuneforge.models.spec import DpoHyperparameters
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
class DpoConfig(RecipeConfig):
    """A DPO run on preference pairs."""

    hyperparameters: DpoHyperparameters = field(
        default_factory=DpoHyperparameters, metadata={"help": "DPO hyperparameters, beta included."}
    )
    loss_type: str = field(default="sigmoid", metadata={"help": "TRL DPO loss: sigmoid is the paper's."})


def train(cfg: DpoConfig, observer: RunObserver | None = None) -> Finished:
    from trl import DPOConfig, DPOTrainer

    # Load
    hp_in = cfg.hyperparameters
    tokenizer = load_tokenizer(cfg.model_dir)
    train_data = read_training_file(cfg.train_file, "dpo", tokenizer, hp_in.max_seq_length)
    valid_data = (
        read_training_file(cfg.valid_file, "dpo", tokenizer, hp_in.max_seq_length, split="validation")
        if cfg.valid_file
        else None
    )
    device = detect_device()
    model = load_model(cfg.model_dir, device, cfg.adapter, trust_remote_code=cfg.trust_remote_code)
    # A continued job trains its parent's adapter; TRL then keeps a frozen copy of it ("ref") as
    # the reference, so the policy is held near the parent model, not the raw base.
    model, new_adapter = trainable_model(model, cfg.adapter, cfg.source_adapter)
    reference = None
    if cfg.adapter.type == "full":
        reference = load_model(cfg.model_dir, device, trust_remote_code=cfg.trust_remote_code)
        reference.requires_grad_(False).eval()

    # Set up
    hp = resolve(
        hp_in,
        method="dpo",
        adapter=cfg.adapter.type,
        n_examples=train_data.stats.examples,
        packing=choose_packing(hp_in.packing, "dpo", device),
        has_validation=valid_data is not None,
    )
    args = DPOConfig(
        **runtime_arguments(cfg, device, model),
        **trainer_arguments(hp, has_validation=valid_data is not None),
        loss_type=[cfg.loss_type],
    )
    trainer = DPOTrainer(
        model=model,
        ref_model=reference,
        args=args,
        train_dataset=train_data.dataset(),
        eval_dataset=valid_data.dataset() if valid_data else None,
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
            method="dpo",
            tokenizer=tokenizer,
            device=device,
            hp=hp,
            train_data=train_data,
            valid_data=valid_data,
            batching="padded",
        ),
    )
