"""Reinforcement fine-tuning (OpenAI's `method.type: "reinforcement"`) with TRL's GRPOTrainer: each
prompt is answered `num_generations` times, the job's grader (tuneforge/graders) scores every
answer against the line's item, and the policy moves towards the answers that scored above their
group's mean. Adapter runs use the base with the adapter switched off as the KL reference; full runs
a frozen copy that TRL loads; a job continued from an adapter trains it against a frozen copy of it.

Data: chat lines whose last message is the user's (the prompt); every other top-level field of a
line is the grader's `{{item.<field>}}`. A grader that fails on a sample (a reference the item cannot
fill, a python grader that raises, a model grader whose call fails) gives that sample reward 0 and
is counted (`grader_failures`); one that fails on every sample of a step fails the run.

Reads top to bottom: load, set up, train, save."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tuneforge.graders.references import ItemReference, item_references
from tuneforge.graders.run import ERROR_FLAGS, GraderRuntime, run_grader
from tuneforge.graders.schema import parse_grader
from tuneforge.graders.templates import Namespaces, TemplateError
from tuneforge.models.spec import ReinforcementHyperparameters
from tuneforge.training.common import (
    Finished,
    RecipeConfig,
    RecipeRun,
    keep_adapter_in_float32_on_cpu,
    runtime_arguments,
    train_and_save,
)
from tuneforge.training.data import DataError, DataStats, TrainingData, ensure_chat_template
from tuneforge.training.formats import (
    DataFormat,
    FormatError,
    check_record,
    detect_format,
    parse_line,
)
from tuneforge.training.hyperparams import EffectiveHyperparameters, resolve, trainer_arguments
from tuneforge.training.interface import RunObserver
from tuneforge.training.loading import (
    detect_device,
    load_model,
    load_tokenizer,
    take_over_optimizer_state,
    trainable_model,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from tuneforge.graders.schema import Grader

ITEM_COLUMN = "tuneforge_item"  # the line's item, as JSON (one string column whatever its fields)
DEFAULT_NUM_GENERATIONS = 4
DEFAULT_BETA = 0.04
#: GRPO's step is gentler than supervised learning's: DPO's base rates (tuneforge.training.hyperparams).
RATE_METHOD: Literal["dpo"] = "dpo"


class GraderFailed(RuntimeError):
    """The grader failed on every sample of a step: nothing in the step can be learned from."""


@dataclass
class GrpoConfig(RecipeConfig):
    """A GRPO run on prompts, rewarded by an OpenAI grader."""

    hyperparameters: ReinforcementHyperparameters = field(
        default_factory=ReinforcementHyperparameters,
        metadata={"help": "RFT hyperparameters (OpenAI's) and the GRPO extensions."},
    )
    grader: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "The OpenAI grader that scores each sampled answer."}
    )
    grader_runtime: GraderRuntime = field(
        default_factory=GraderRuntime,
        metadata={"help": "What python and model graders may use (the service's settings)."},
    )


# Data


def line_item(record: dict[str, Any]) -> dict[str, Any]:
    """What the grader reads as `item`: every top-level field but the prompt's messages."""
    return {key: value for key, value in record.items() if key != "messages"}


def missing_reference(record: dict[str, Any], references: list[ItemReference]) -> ItemReference | None:
    """The first of `references` that this line's item cannot fill, or None."""
    item = line_item(record)
    for reference in references:
        if len(reference.segments) == 1:
            if reference.key not in item:
                return reference
            continue
        try:
            Namespaces("", item).lookup(".".join(("item", *reference.segments)))
        except TemplateError:
            return reference
    return None


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) if isinstance(part, dict) else str(part) for part in content)
    return "" if content is None else str(content)


def _not_a_prompt(record: dict[str, Any], line_format: DataFormat) -> str:
    messages = record.get("messages")
    if not isinstance(messages, list):
        return f"is {line_format.value}; reinforcement needs chat lines whose last message is the user's"
    if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "user":
        return "holds an assistant message; a reinforcement prompt is system and user messages only"
    return "the last message is not from the user: every line of reinforcement prompts ends with one"


def check_item_references(path: Path, grader: dict[str, Any]) -> None:
    """Raises DataError naming the first line whose item lacks a field the grader reads."""
    references = item_references(grader)
    if not references:
        return
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            record = parse_line(raw, number) if raw.strip() else None
            missing = missing_reference(record, references) if isinstance(record, dict) else None
            if missing is not None:
                reason = f"the grader reads {missing.text} ({missing.param}), which this line does not have"
                raise DataError(f"{path.name}: line {number}: {reason}")


def read_prompt_file(
    path: Path,
    tokenizer: PreTrainedTokenizerBase,
    max_seq_length: int,
    *,
    split: str = "train",
    grader: dict[str, Any] | None = None,
) -> TrainingData:
    """Reads RFT lines into TRL's conversational prompt rows, checking each line's format and, with a
    grader, that its `{{item.*}}` references exist; raises DataError naming the file and line."""
    references = item_references(grader) if grader else []
    rows: list[dict[str, Any]] = []
    warnings: Counter[str] = Counter()
    lengths: list[int] = []
    try:
        with path.open("rb") as handle:
            for number, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                record = parse_line(raw, number)
                try:
                    line_format = detect_format(record, "reinforcement")
                    if line_format is not DataFormat.REINFORCEMENT:
                        raise ValueError(_not_a_prompt(record, line_format))
                    check_record(record, line_format)
                    missing = missing_reference(record, references)
                    if missing is not None:
                        reason = f"the grader reads {missing.text} ({missing.param})"
                        raise ValueError(f"{reason}, which this line does not have")
                except ValueError as exc:
                    raise FormatError(number, str(exc)) from None
                prompt = [
                    {"role": str(m["role"]), "content": _text(m.get("content"))} for m in record["messages"]
                ]
                rows.append(
                    {"prompt": prompt, ITEM_COLUMN: json.dumps(line_item(record), ensure_ascii=False)}
                )
    except FormatError as exc:
        raise DataError(f"{path.name}: {exc}") from None
    if not rows:
        raise DataError(f"{path.name}: the file holds no examples")
    if ensure_chat_template(tokenizer):
        warnings["chat_template_missing_used_chatml"] += 1
    for row in rows:
        ids = tokenizer.apply_chat_template(row["prompt"], tokenize=True, add_generation_prompt=True)
        n_tokens = len(ids["input_ids"] if isinstance(ids, dict) else ids)
        if n_tokens > max_seq_length:
            warnings["long_prompts"] += 1
        lengths.append(n_tokens)
    stats = DataStats(format="reinforcement")
    stats.examples = len(rows)
    stats.tokens = sum(lengths)
    stats.min_tokens, stats.max_tokens = min(lengths), max(lengths)
    return TrainingData(kind="prompt", rows=rows, stats=stats, warnings=+warnings)


# The reward


class GraderReward:
    """TRL's reward function: the job's grader on each sampled answer and its line's item."""

    __name__ = "grader"

    def __init__(self, grader: dict[str, Any], runtime: GraderRuntime) -> None:
        self.grader: Grader = parse_grader(grader)
        self.runtime = runtime
        self.failures = 0  # samples the grader failed on, over the whole run

    def score(self, answer: str, item: dict[str, Any]) -> tuple[float, str | None]:
        """The reward, and why the grader failed (None when it did not)."""
        try:
            result = run_grader(self.grader, answer, item, self.runtime)
        except Exception as exc:  # a grader's failure is the sample's, never the run's
            return 0.0, f"{type(exc).__name__}: {exc}"
        errors = result["metadata"]["errors"]
        failed = [flag for flag in ERROR_FLAGS if errors.get(flag)]
        return float(result["reward"]), (", ".join(failed) if failed else None)

    def __call__(
        self, prompts: list[Any], completions: list[Any], log_metric: Any = None, **columns: Any
    ) -> list[float]:
        rewards: list[float] = []
        failures: list[str] = []
        for completion, item in zip(completions, columns[ITEM_COLUMN], strict=True):
            answer = _text(completion[-1].get("content")) if isinstance(completion, list) else str(completion)
            reward, failure = self.score(answer, json.loads(item))
            rewards.append(reward if failure is None else 0.0)
            if failure is not None:
                failures.append(failure)
        self.failures += len(failures)
        if rewards and len(failures) == len(rewards):
            raise GraderFailed(
                f"the grader failed on every one of the step's {len(rewards)} samples "
                f"(first: {failures[0]}); check its templates against the training file's fields"
            )
        if log_metric is not None:
            log_metric("grader_failures", float(len(failures)))
        return rewards


# The recipe


def num_generations(hp_in: ReinforcementHyperparameters) -> int:
    """Answers sampled per prompt: the job's, or (auto) 4 scaled by compute_multiplier, at least 2.
    The estimator (tuneforge.estimates.methods) counts memory with the same rule."""
    if hp_in.num_generations != "auto":
        return hp_in.num_generations
    compute = 1.0 if hp_in.compute_multiplier == "auto" else float(hp_in.compute_multiplier)
    return max(2, round(DEFAULT_NUM_GENERATIONS * compute))


def kl_beta(hp_in: ReinforcementHyperparameters) -> float:
    """The KL penalty's weight; at 0 TRL loads no reference model."""
    return DEFAULT_BETA if hp_in.beta == "auto" else float(hp_in.beta)


def _resolve(
    hp_in: ReinforcementHyperparameters, adapter: str, n_examples: int, has_validation: bool
) -> tuple[EffectiveHyperparameters, dict[str, Any]]:
    """The effective hyperparameters (batch_size in prompts) and the GRPO settings."""
    compute = 1.0 if hp_in.compute_multiplier == "auto" else float(hp_in.compute_multiplier)
    generations = num_generations(hp_in)
    if hp_in.eval_interval != "auto" and hp_in.eval_every_steps is None:
        hp_in = hp_in.model_copy(update={"eval_every_steps": hp_in.eval_interval})
    hp = resolve(
        hp_in,
        method=RATE_METHOD,
        adapter=adapter,  # type: ignore[arg-type]
        n_examples=n_examples,
        packing=False,
        has_validation=has_validation,
    )
    hp = dataclasses.replace(hp, beta=kl_beta(hp_in))
    grpo = {
        "num_generations": generations,
        "num_generations_eval": generations if hp_in.eval_samples == "auto" else hp_in.eval_samples,
        "max_new_tokens": hp_in.max_new_tokens,
        "temperature": hp_in.temperature,
        "compute_multiplier": compute,
    }
    return hp, grpo


def grpo_arguments(
    hp: EffectiveHyperparameters, grpo: dict[str, Any], *, has_validation: bool
) -> dict[str, Any]:
    """GRPOConfig keyword arguments: each step samples `num_generations` answers to `batch_size`
    prompts (TRL counts completions in its batch sizes) and learns from them once (on-policy)."""
    args = trainer_arguments(hp, has_validation=has_validation)
    args.pop("max_length", None)  # GRPO bounds the answers instead
    args |= {
        "per_device_train_batch_size": hp.batch_size * grpo["num_generations"],
        "per_device_eval_batch_size": hp.batch_size * grpo["num_generations_eval"],
        "num_generations": grpo["num_generations"],
        "num_generations_eval": grpo["num_generations_eval"],
        "steps_per_generation": hp.gradient_accumulation_steps,
        "max_completion_length": grpo["max_new_tokens"],
        "temperature": grpo["temperature"],
        "beta": hp.beta,
        "log_completions": False,
        # A GRPO batch has no input_ids for the Trainer to count (it warned on every step); TRL
        # logs the step's prompt and completion tokens itself (`num_tokens`).
        "include_num_input_tokens_seen": "no",
    }
    if has_validation and args.get("metric_for_best_model") == "eval_loss":
        args |= {"metric_for_best_model": "eval_reward", "greater_is_better": True}
    return args


def train(cfg: GrpoConfig, observer: RunObserver | None = None) -> Finished:
    from trl import GRPOConfig, GRPOTrainer

    # Load
    hp_in = cfg.hyperparameters
    tokenizer = load_tokenizer(cfg.model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    reward = GraderReward(cfg.grader, cfg.grader_runtime)
    train_data = read_prompt_file(cfg.train_file, tokenizer, hp_in.max_seq_length, grader=cfg.grader)
    valid_data = (
        read_prompt_file(
            cfg.valid_file, tokenizer, hp_in.max_seq_length, split="validation", grader=cfg.grader
        )
        if cfg.valid_file
        else None
    )
    device = detect_device()
    model = load_model(cfg.model_dir, device, cfg.adapter, trust_remote_code=cfg.trust_remote_code)
    model, new_adapter = trainable_model(model, cfg.adapter, cfg.source_adapter)

    # Set up
    hp, grpo = _resolve(hp_in, cfg.adapter.type, train_data.stats.examples, valid_data is not None)
    args = GRPOConfig(
        **runtime_arguments(cfg, device, model)
        | grpo_arguments(hp, grpo, has_validation=valid_data is not None)
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward,  # type: ignore[arg-type]
        args=args,
        train_dataset=train_data.dataset(),
        eval_dataset=valid_data.dataset() if valid_data else None,
        processing_class=tokenizer,
        peft_config=new_adapter,
    )
    keep_adapter_in_float32_on_cpu(trainer, device)
    take_over_optimizer_state(trainer, cfg.source_state, resuming=cfg.resume_from is not None)

    # Train, save
    finished = train_and_save(
        trainer,
        cfg,
        observer,
        RecipeRun(
            method="reinforcement",
            tokenizer=tokenizer,
            device=device,
            hp=hp,
            train_data=train_data,
            valid_data=valid_data,
            batching=f"{grpo['num_generations']} sampled answers per prompt",
        ),
    )
    result = finished.result
    result.report["reinforcement"] = {**grpo, "grader": cfg.grader}
    if reward.failures:
        result.warnings["grader_failures"] = reward.failures
        result.report["warnings"] = result.warnings
    return finished
