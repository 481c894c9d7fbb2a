"""Effective hyperparameters: the job's `Hyperparameters` with every "auto" resolved from the data.

Pure Python (no torch), so the API and estimates can show the same resolved values.

Rules for "auto" (OpenAI-like, documented in the run report under `hyperparameters.rules`):

- `n_epochs`: 3, raised so that a small file is seen at least `MIN_TARGET_EXAMPLES` times in all
  (at most 25 epochs), lowered so that a large one is not seen more than `MAX_TARGET_EXAMPLES` times
  (at least 1 epoch).
- `batch_size`: about 0.2% of the examples, rounded down to a power of two, between 4 and 256 and
  never more than the number of examples.
- `learning_rate`: the method and adapter's base rate (`BASE_LEARNING_RATES`) times
  `learning_rate_multiplier` ("auto" = 1.0); an explicit `learning_rate` wins over both.
- `beta` (DPO): 0.1.
- `save_every_steps`: a quarter of the run (total_steps // 4, at least 1), so a run leaves four
  checkpoints or so; `eval_every_steps`: each epoch when a validation file is given.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from tuneforge.models.spec import AdapterType, DpoHyperparameters, Hyperparameters, MethodType
from tuneforge.training.distributed import per_device_batch

MIN_TARGET_EXAMPLES = 100
MAX_TARGET_EXAMPLES = 25_000
DEFAULT_EPOCHS = 3
MAX_AUTO_EPOCHS = 25
DEFAULT_BETA = 0.1

# Base learning rates per adapter type. PEFT methods that train few parameters need higher rates.
BASE_LEARNING_RATES: dict[str, dict[str, float]] = {
    "supervised": {
        "lora": 2e-4,
        "dora": 2e-4,
        "qlora": 2e-4,
        "ia3": 3e-3,
        "prefix_tuning": 1e-2,
        "prompt_tuning": 3e-2,
        "full": 2e-5,
    },
    "pretraining": {
        "lora": 2e-4,
        "dora": 2e-4,
        "qlora": 2e-4,
        "ia3": 3e-3,
        "prefix_tuning": 1e-2,
        "prompt_tuning": 3e-2,
        "full": 2e-5,
    },
    # DPO moves a model away from its reference: an order of magnitude gentler.
    "dpo": {
        "lora": 2e-5,
        "dora": 2e-5,
        "qlora": 2e-5,
        "ia3": 3e-4,
        "prefix_tuning": 1e-3,
        "prompt_tuning": 3e-3,
        "full": 1e-6,
    },
}

RULES = {
    "n_epochs": (
        f"auto: {DEFAULT_EPOCHS}, raised to see at least {MIN_TARGET_EXAMPLES} examples "
        f"(max {MAX_AUTO_EPOCHS}), lowered to see at most {MAX_TARGET_EXAMPLES} (min 1)"
    ),
    "batch_size": "auto: 0.2% of the examples, rounded down to a power of two, in [4, 256], <= examples",
    "learning_rate": "base rate of method and adapter x learning_rate_multiplier (auto = 1.0)",
    "beta": f"auto: {DEFAULT_BETA}",
    "save_every_steps": "default: total_steps // 4, at least 1",
    "eval_every_steps": "default: once per epoch when a validation file is given",
}


@dataclass(frozen=True)
class EffectiveHyperparameters:
    """Every value a run uses, none of them "auto"."""

    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float
    learning_rate: float
    max_steps: int | None
    max_seq_length: int
    gradient_accumulation_steps: int
    warmup_ratio: float
    lr_scheduler_type: str
    weight_decay: float
    packing: bool
    eval_every_steps: int | None
    save_every_steps: int | None
    early_stopping_patience: int | None
    beta: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def auto_epochs(n_examples: int) -> int:
    n = max(1, n_examples)
    if n * DEFAULT_EPOCHS < MIN_TARGET_EXAMPLES:
        return min(MAX_AUTO_EPOCHS, math.ceil(MIN_TARGET_EXAMPLES / n))
    if n * DEFAULT_EPOCHS > MAX_TARGET_EXAMPLES:
        return max(1, MAX_TARGET_EXAMPLES // n)
    return DEFAULT_EPOCHS


def auto_batch_size(n_examples: int) -> int:
    target = max(4.0, n_examples * 0.002)
    power = 2 ** math.floor(math.log2(target))
    return max(1, min(256, power, n_examples))


def base_learning_rate(method: MethodType, adapter: AdapterType) -> float:
    return BASE_LEARNING_RATES[method][adapter]


def steps_per_epoch(n_rows: int, batch_size: int, gradient_accumulation_steps: int) -> int:
    """Optimizer steps in one epoch, as transformers' Trainer counts them."""
    batches = math.ceil(n_rows / batch_size)
    return max(1, math.ceil(batches / gradient_accumulation_steps))


def total_steps(n_rows: int, hp: EffectiveHyperparameters) -> int:
    if hp.max_steps is not None:
        return hp.max_steps
    return hp.n_epochs * steps_per_epoch(n_rows, hp.batch_size, hp.gradient_accumulation_steps)


def resolve(
    hp: Hyperparameters,
    *,
    method: MethodType,
    adapter: AdapterType,
    n_examples: int,
    packing: bool,
    has_validation: bool,
    n_rows: int | None = None,
) -> EffectiveHyperparameters:
    """Resolves "auto" values from the number of training examples.

    `packing` is the batching the recipe chose (see `choose_packing`); `n_examples` counts the
    examples that will train (after the reader dropped unusable ones); `n_rows` the training rows
    when packing makes them fewer (pretraining), for the default checkpoint interval.
    """
    n_epochs = auto_epochs(n_examples) if hp.n_epochs == "auto" else hp.n_epochs
    batch_size = auto_batch_size(n_examples) if hp.batch_size == "auto" else hp.batch_size
    multiplier = 1.0 if hp.learning_rate_multiplier == "auto" else float(hp.learning_rate_multiplier)
    learning_rate = (
        hp.learning_rate if hp.learning_rate is not None else base_learning_rate(method, adapter) * multiplier
    )
    beta: float | None = None
    if isinstance(hp, DpoHyperparameters):
        beta = DEFAULT_BETA if hp.beta == "auto" else float(hp.beta)
    draft = EffectiveHyperparameters(
        n_epochs=n_epochs,
        batch_size=batch_size,
        learning_rate_multiplier=multiplier,
        learning_rate=learning_rate,
        max_steps=hp.max_steps,
        max_seq_length=hp.max_seq_length,
        gradient_accumulation_steps=hp.gradient_accumulation_steps,
        warmup_ratio=hp.warmup_ratio,
        lr_scheduler_type=hp.lr_scheduler_type,
        weight_decay=hp.weight_decay,
        packing=packing,
        eval_every_steps=hp.eval_every_steps,
        save_every_steps=hp.save_every_steps,
        early_stopping_patience=hp.early_stopping_patience if has_validation else None,
        beta=beta,
    )
    if draft.save_every_steps is None:
        steps = total_steps(n_rows or n_examples, draft)
        draft = EffectiveHyperparameters(**{**draft.as_dict(), "save_every_steps": max(1, steps // 4)})
    return draft


def trainer_arguments(hp: EffectiveHyperparameters, *, has_validation: bool) -> dict[str, Any]:
    """The hyperparameters as SFTConfig/DPOConfig keyword arguments (transformers 5, TRL 1.16 names)."""
    args: dict[str, Any] = {
        "num_train_epochs": hp.n_epochs,
        # batch_size is the global batch: a multi-device run splits it (tuneforge.training.distributed)
        "per_device_train_batch_size": per_device_batch(hp.batch_size),
        "per_device_eval_batch_size": per_device_batch(hp.batch_size),
        "learning_rate": hp.learning_rate,
        "max_steps": hp.max_steps if hp.max_steps is not None else -1,
        "max_length": hp.max_seq_length,
        "gradient_accumulation_steps": hp.gradient_accumulation_steps,
        # transformers 5: a float below 1 in warmup_steps is a ratio of the total steps.
        "warmup_steps": hp.warmup_ratio,
        "lr_scheduler_type": hp.lr_scheduler_type,
        "weight_decay": hp.weight_decay,
        "save_strategy": "steps",
        "save_steps": hp.save_every_steps,
    }
    if has_validation:
        if hp.eval_every_steps is not None:
            args |= {"eval_strategy": "steps", "eval_steps": hp.eval_every_steps}
        else:
            args |= {"eval_strategy": "epoch"}
        if hp.early_stopping_patience is not None:
            args |= {"metric_for_best_model": "eval_loss", "greater_is_better": False}
    else:
        args |= {"eval_strategy": "no"}
    if hp.beta is not None:
        args["beta"] = hp.beta
    return args
