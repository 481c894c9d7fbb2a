"""Reward modelling (`method.type: "reward_model"`) with TRL's RewardTrainer on preference pairs:
the base loaded as a sequence classifier with one output (a fresh `score` head), trained with the
Bradley-Terry loss so that the chosen answer scores above the rejected one.

The artifact is a PEFT adapter of task type SEQ_CLS whose saved modules include the score head
(full runs: the whole classifier), so it loads with
`AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)` plus
`PeftModel.from_pretrained(that, adapter_dir)` and scores a chat-templated text with its logit.
A merged (or GGUF) export is not offered (the merge loads a causal LM); asking for one is a warning.
A job continued from a fine-tuned model is refused: the parent's adapter is a causal LM's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from tuneforge.models.spec import Hyperparameters, RewardModelHyperparameters
from tuneforge.training.common import (
    Finished,
    RecipeConfig,
    RecipeRun,
    keep_adapter_in_float32_on_cpu,
    runtime_arguments,
    train_and_save,
)
from tuneforge.training.data import read_training_file
from tuneforge.training.hyperparams import trainer_arguments
from tuneforge.training.interface import RunObserver
from tuneforge.training.loading import load_model, load_tokenizer, peft_config
from tuneforge.training.preference import effective_hyperparameters

#: Adapter types a classifier head trains with (the prompt-learning ones have no SEQ_CLS path here).
REWARD_ADAPTERS = frozenset({"lora", "dora", "qlora", "full"})


@dataclass
class RewardConfig(RecipeConfig):
    """A reward-model run on preference pairs."""

    hyperparameters: Hyperparameters = field(
        default_factory=RewardModelHyperparameters, metadata={"help": "Reward-model hyperparameters."}
    )


def train(cfg: RewardConfig, observer: RunObserver | None = None) -> Finished:
    from peft import TaskType
    from trl import RewardConfig as TrlRewardConfig
    from trl import RewardTrainer

    from tuneforge.training.loading import detect_device

    if cfg.source_adapter is not None:
        raise ValueError(
            "reward_model starts from a base model: a fine-tuned parent's adapter has no score head"
        )
    if cfg.adapter.type not in REWARD_ADAPTERS:
        raise ValueError(
            f"reward_model trains a classifier head with adapter.type lora, dora, qlora or full, "
            f"not {cfg.adapter.type!r}"
        )
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
    model = load_model(
        cfg.model_dir,
        device,
        cfg.adapter,
        trust_remote_code=cfg.trust_remote_code,
        score_head_pad_token_id=tokenizer.pad_token_id,
    )
    adapter = peft_config(cfg.adapter, model)
    if adapter is not None:  # SEQ_CLS: PEFT trains and saves the new score head beside the adapter
        adapter.task_type = TaskType.SEQ_CLS

    # Set up
    hp = effective_hyperparameters(cfg, "reward_model", train_data.stats.examples, valid_data is not None)
    extra: dict[str, Any] = {}
    if isinstance(hp_in, RewardModelHyperparameters) and hp_in.center_rewards_coefficient is not None:
        extra["center_rewards_coefficient"] = hp_in.center_rewards_coefficient
    args = TrlRewardConfig(
        **runtime_arguments(cfg, device, model),
        **trainer_arguments(hp, has_validation=valid_data is not None),
        **extra,
    )
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=train_data.dataset(),
        eval_dataset=valid_data.dataset() if valid_data else None,
        processing_class=tokenizer,
        peft_config=adapter,
    )
    keep_adapter_in_float32_on_cpu(trainer, device)

    # Train, save (no merged export: see the module's docstring)
    exports: dict[str, Any] = {"export_merged": False}
    if hasattr(cfg, "export_gguf"):  # GGUF converts a merged causal LM
        exports["export_gguf"] = None
    asked = any(getattr(cfg, name) for name in exports)
    save_cfg = dataclasses.replace(cfg, **exports) if asked else cfg
    finished = train_and_save(
        trainer,
        save_cfg,
        observer,
        RecipeRun(
            method="reward_model",
            tokenizer=tokenizer,
            device=device,
            hp=hp,
            train_data=train_data,
            valid_data=valid_data,
            batching="padded",
        ),
    )
    if asked:
        finished.result.warnings["merge_not_supported_for_reward_model"] = 1
        finished.result.report["warnings"] = finished.result.warnings
    return finished


def score(model: Any, tokenizer: Any, prompt: Any, answer: Any) -> float:
    """The reward of one answer: the classifier's logit on the chat-templated conversation (or on
    prompt + answer for plain strings), as the trainer saw it."""
    import torch

    if isinstance(prompt, list):
        messages = prompt + (
            answer if isinstance(answer, list) else [{"role": "assistant", "content": answer}]
        )
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt + answer)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids], device=model.device)).logits
    return float(logits[0, 0])
