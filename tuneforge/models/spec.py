"""The job spec: one pydantic model shared by the API (which validates it) and the worker and
training recipes (which run it). Field names follow OpenAI's fine-tuning API where it has them;
the rest are Tuneforge extensions listed in CONTRACT.md.

A spec is stored on the job as JSON (`JobSpec.model_dump(mode="json")`) and read back with
`JobSpec.model_validate`. Every field has a description: they are the help text of the API.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

Auto = Literal["auto"]
MethodType = Literal[
    "supervised", "dpo", "pretraining", "orpo", "simpo", "kto", "reward_model", "reinforcement"
]
#: Preference methods beyond DPO (tuneforge.training.preference, tuneforge.training.reward).
PREFERENCE_METHODS = ("orpo", "simpo", "kto", "reward_model")
AdapterType = Literal["lora", "qlora", "dora", "prefix_tuning", "prompt_tuning", "ia3", "full"]
#: Adapters of virtual tokens before the prompt, which PEFT 0.21's generate misplaces under
#: transformers 5 (tuneforge/training/generation.py decodes them instead).
PROMPT_LEARNING_ADAPTERS = ("prompt_tuning", "prefix_tuning")
#: Bounds that keep a spec's numbers inside what the trainer and the database hold (int32 steps).
MAX_STEP_COUNT = 2**31 - 1
MAX_LORA_ALPHA = 4096.0
LrScheduler = Literal[
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Hyperparameters(_Strict):
    """Hyperparameters of supervised and pretraining runs. `"auto"` is resolved by the recipe from
    the data size (see `tuneforge.training.hyperparams`) and the resolved values are reported."""

    n_epochs: Annotated[int, Field(ge=1, le=50)] | Auto = Field(
        "auto", description="Passes over the training data (1-50)."
    )
    batch_size: Annotated[int, Field(ge=1, le=256)] | Auto = Field(
        "auto", description="Examples per optimizer step, before gradient accumulation (1-256)."
    )
    learning_rate_multiplier: Annotated[float, Field(gt=0, le=100)] | Auto = Field(
        "auto", description="Scales the method's base learning rate."
    )
    learning_rate: Annotated[float, Field(gt=0, le=1)] | None = Field(
        None, description="Absolute learning rate; overrides the multiplier."
    )
    max_steps: Annotated[int, Field(ge=1, le=MAX_STEP_COUNT)] | None = Field(
        None,
        description="Stop after this many optimizer steps, whatever n_epochs says (the service's "
        "ceiling, TUNEFORGE_MAX_JOB_STEPS, applies).",
    )
    max_seq_length: Annotated[int, Field(ge=8, le=131072)] = Field(
        1024, description="Longer examples are truncated, and counted in the run's report."
    )
    gradient_accumulation_steps: Annotated[int, Field(ge=1, le=1024)] = Field(
        1, description="Micro-batches per optimizer step."
    )
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.0, description="Fraction of the steps spent warming the learning rate up."
    )
    lr_scheduler_type: LrScheduler = Field("linear", description="Learning-rate schedule.")
    weight_decay: Annotated[float, Field(ge=0, le=1)] = Field(0.0, description="AdamW weight decay.")
    packing: bool | None = Field(
        None,
        description="Padding-free packing of examples; None chooses by device and attention kernel.",
    )
    eval_every_steps: Annotated[int, Field(ge=1, le=MAX_STEP_COUNT)] | None = Field(
        None, description="Evaluate on the validation file every N steps (default: each epoch)."
    )
    save_every_steps: Annotated[int, Field(ge=1, le=MAX_STEP_COUNT)] | None = Field(
        None, description="Checkpoint every N steps (default: a few checkpoints per run)."
    )
    early_stopping_patience: Annotated[int, Field(ge=1, le=MAX_STEP_COUNT)] | None = Field(
        None, description="Stop after this many evaluations without a better validation loss."
    )


class DpoHyperparameters(Hyperparameters):
    beta: Annotated[float, Field(gt=0, le=2)] | Auto = Field(
        "auto", description="DPO temperature: how far the policy may move from the reference (0-2]."
    )


DpoLossType = Literal[
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
]


class DpoLossHyperparameters(DpoHyperparameters):
    """DPO's hyperparameters with TRL's loss variant (`method.dpo.hyperparameters`)."""

    loss_type: DpoLossType = Field(
        "sigmoid", description="TRL's DPO loss: sigmoid (the paper's), ipo, hinge, robust, apo_zero, ..."
    )


class OrpoHyperparameters(Hyperparameters):
    beta: Annotated[float, Field(gt=0, le=10)] | Auto = Field(
        "auto", description="ORPO's lambda: weight of the odds-ratio term beside the SFT loss (auto: 0.1)."
    )


class SimpoHyperparameters(Hyperparameters):
    beta: Annotated[float, Field(gt=0, le=20)] | Auto = Field(
        "auto", description="SimPO's reward scale on the length-normalised log-probability (auto: 2.0)."
    )
    gamma: Annotated[float, Field(ge=0, le=20)] = Field(
        0.5, description="SimPO's target reward margin (TRL's simpo_gamma)."
    )
    cpo_alpha: Annotated[float, Field(ge=0, le=10)] = Field(
        0.0, description="Weight of a behaviour-cloning (SFT) term on the chosen answers; 0 is pure SimPO."
    )


class KtoHyperparameters(Hyperparameters):
    beta: Annotated[float, Field(gt=0, le=2)] | Auto = Field(
        "auto", description="KTO temperature: how far the policy may move from the reference (auto: 0.1)."
    )
    desirable_weight: Annotated[float, Field(gt=0, le=100)] = Field(
        1.0, description="Weight of the losses of desirable (label true) lines."
    )
    undesirable_weight: Annotated[float, Field(gt=0, le=100)] = Field(
        1.0, description="Weight of the losses of undesirable (label false) lines."
    )


class RewardModelHyperparameters(Hyperparameters):
    center_rewards_coefficient: Annotated[float, Field(ge=0, le=1)] | None = Field(
        None, description="Pulls the rewards' mean towards zero (TRL's center_rewards_coefficient)."
    )


class ReinforcementHyperparameters(Hyperparameters):
    """OpenAI's reinforcement hyperparameters, plus Tuneforge's GRPO knobs (TRL's GRPOTrainer).
    `batch_size` counts prompts per step; each prompt is answered `num_generations` times."""

    compute_multiplier: Annotated[float, Field(gt=0, le=10)] | Auto = Field(
        "auto", description="Scales the sampling done per prompt (auto: 1.0): num_generations when auto."
    )
    eval_interval: Annotated[int, Field(ge=1, le=MAX_STEP_COUNT)] | Auto = Field(
        "auto", description="Steps between graded evaluations of the validation file (auto: each epoch)."
    )
    eval_samples: Annotated[int, Field(ge=1, le=64)] | Auto = Field(
        "auto", description="Answers sampled per validation prompt at an evaluation (auto: num_generations)."
    )
    num_generations: Annotated[int, Field(ge=2, le=64)] | Auto = Field(
        "auto", description="Answers sampled per prompt, compared with each other (GRPO's group; auto: 4)."
    )
    max_new_tokens: Annotated[int, Field(ge=1, le=32768)] = Field(
        64, description="Most tokens in one sampled answer."
    )
    temperature: Annotated[float, Field(gt=0, le=5)] = Field(1.0, description="Sampling temperature.")
    beta: Annotated[float, Field(ge=0, le=2)] | Auto = Field(
        "auto",
        description="Weight of the KL penalty towards the starting model; 0 drops the reference "
        "model (auto: 0.04).",
    )


class ReinforcementMethod(_Strict):
    """OpenAI's `method.reinforcement`: the grader that scores sampled answers, and its training knobs."""

    grader: dict[str, Any] = Field(
        ...,
        description="An OpenAI grader (string_check, text_similarity, multi, python, score_model) that "
        "reads {{sample.output_text}} and {{item.<field>}} of the training line.",
    )
    hyperparameters: ReinforcementHyperparameters = Field(default_factory=ReinforcementHyperparameters)

    @field_validator("grader")
    @classmethod
    def _valid_grader(cls, grader: dict[str, Any]) -> dict[str, Any]:
        return _checked_grader(grader)


def _checked_grader(grader: dict[str, Any]) -> dict[str, Any]:
    """A bad grader is an error at its own field (`evaluation.grader.operation`)."""
    from tuneforge.graders.schema import GraderError, parse_grader

    try:
        parse_grader(grader)
    except GraderError as exc:
        where = exc.param.split(".")[1:]
        message = exc.message.removeprefix(f"Invalid value for '{exc.param}': ").removesuffix(".")
        detail = PydanticCustomError("invalid_grader", "{message}", {"message": message})
        raise ValidationError.from_exception_data(
            "grader", [InitErrorDetails(type=detail, loc=tuple(where), input=grader)]
        ) from None
    return grader


class SupervisedMethod(_Strict):
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class DpoMethod(_Strict):
    hyperparameters: DpoLossHyperparameters = Field(default_factory=DpoLossHyperparameters)


class OrpoMethod(_Strict):
    hyperparameters: OrpoHyperparameters = Field(default_factory=OrpoHyperparameters)


class SimpoMethod(_Strict):
    hyperparameters: SimpoHyperparameters = Field(default_factory=SimpoHyperparameters)


class KtoMethod(_Strict):
    hyperparameters: KtoHyperparameters = Field(default_factory=KtoHyperparameters)


class RewardModelMethod(_Strict):
    hyperparameters: RewardModelHyperparameters = Field(default_factory=RewardModelHyperparameters)


class PretrainingMethod(_Strict):
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class Method(_Strict):
    """OpenAI's `method` object, plus the `pretraining` type (continued pre-training on raw text)."""

    type: MethodType = Field(
        "supervised",
        description="supervised, dpo, pretraining, orpo, simpo, kto, reward_model or reinforcement.",
    )
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None
    pretraining: PretrainingMethod | None = None
    orpo: OrpoMethod | None = None
    simpo: SimpoMethod | None = None
    kto: KtoMethod | None = None
    reward_model: RewardModelMethod | None = None
    reinforcement: ReinforcementMethod | None = None

    @model_validator(mode="after")
    def _fill_own_section(self) -> Method:
        if self.type == "supervised" and self.supervised is None:
            self.supervised = SupervisedMethod()
        if self.type == "dpo" and self.dpo is None:
            self.dpo = DpoMethod()
        if self.type == "pretraining" and self.pretraining is None:
            self.pretraining = PretrainingMethod()
        if self.type == "orpo" and self.orpo is None:
            self.orpo = OrpoMethod()
        if self.type == "simpo" and self.simpo is None:
            self.simpo = SimpoMethod()
        if self.type == "kto" and self.kto is None:
            self.kto = KtoMethod()
        if self.type == "reward_model" and self.reward_model is None:
            self.reward_model = RewardModelMethod()
        if self.type == "reinforcement" and self.reinforcement is None:
            detail = PydanticCustomError(
                "missing", "reinforcement needs a grader: give method.reinforcement.grader"
            )
            raise ValidationError.from_exception_data(
                "Method", [InitErrorDetails(type=detail, loc=("reinforcement", "grader"), input=None)]
            )
        return self

    @property
    def hyperparameters(self) -> Hyperparameters:
        """The hyperparameters of the section that `type` names."""
        section = getattr(self, self.type)
        assert section is not None
        hp: Hyperparameters = section.hyperparameters
        return hp


class AdapterSpec(_Strict):
    """Which parameters train. `full` trains them all; the others are PEFT methods."""

    type: AdapterType = Field(
        "lora", description="lora, qlora, dora, prefix_tuning, prompt_tuning, ia3, full."
    )
    r: Annotated[int, Field(ge=1, le=1024)] = Field(16, description="LoRA/DoRA/QLoRA rank.")
    alpha: Annotated[float, Field(gt=0, le=MAX_LORA_ALPHA, allow_inf_nan=False)] = Field(
        32, description="LoRA scaling numerator (lora_alpha), at most 4096."
    )
    dropout: Annotated[float, Field(ge=0, lt=1)] = Field(0.05, description="LoRA dropout.")
    target_modules: (
        Annotated[list[Annotated[str, Field(min_length=1, max_length=256)]], Field(max_length=256)]
        | Literal["all-linear"]
    ) = Field("all-linear", description="Module names to adapt, or all linear layers but the output head.")
    num_virtual_tokens: Annotated[int, Field(ge=1, le=1024)] = Field(
        20, description="Virtual tokens for prefix and prompt tuning."
    )
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="QLoRA 4-bit data type.")
    double_quant: bool = Field(True, description="QLoRA: quantize the quantization constants too.")

    @model_validator(mode="after")
    def _target_modules_not_empty(self) -> AdapterSpec:
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("target_modules must name at least one module, or be 'all-linear'")
        return self


Strategy = Literal["auto", "ddp", "fsdp"]
MAX_DEVICES = 64


class HardwareSpec(_Strict):
    """How many devices one run of the job uses (data parallel under torch.distributed's launcher).
    The same `count` and `strategy` as the estimator's `hardware` object."""

    count: Annotated[int, Field(ge=1, le=MAX_DEVICES)] = Field(
        1,
        description=f"Devices (processes) the run trains on, 1-{MAX_DEVICES}; only a worker with at "
        "least as many runs it.",
    )
    strategy: Strategy = Field(
        "auto",
        description="`ddp` replicates the model on every device; `fsdp` shards weights, gradients and "
        "optimizer state across them. `auto`: fsdp for adapter.type full, ddp otherwise.",
    )

    def resolved_strategy(self, adapter_type: str) -> Literal["ddp", "fsdp"]:
        if self.strategy != "auto":
            return self.strategy
        return "fsdp" if adapter_type == "full" else "ddp"


class WandbIntegration(_Strict):
    """OpenAI's `wandb` fields. The worker logs with its own credentials (WANDB_API_KEY)."""

    project: str = Field(..., min_length=1, max_length=128, description="W&B project of the run.")
    entity: Annotated[str, Field(min_length=1, max_length=128)] | None = Field(
        None, description="W&B team or user; default: the worker's credentials' default entity."
    )
    name: Annotated[str, Field(min_length=1, max_length=128)] | None = Field(
        None, description="Display name of the run; default: the job's id."
    )
    tags: Annotated[list[Annotated[str, Field(min_length=1, max_length=64)]], Field(max_length=32)] = Field(
        default_factory=list, description="Tags of the run (at most 32)."
    )


class WandbEntry(_Strict):
    type: Literal["wandb"]
    wandb: WandbIntegration


class MlflowIntegration(_Strict):
    """Where in the administrator's MLflow tracking server (TUNEFORGE_MLFLOW_TRACKING_URI) the
    run goes; a job cannot name another server or path."""

    experiment: str = Field("tuneforge", min_length=1, max_length=256, description="Experiment name.")
    run_name: Annotated[str, Field(min_length=1, max_length=256)] | None = Field(
        None, description="Run name; default: the job's id."
    )
    tags: dict[Annotated[str, Field(min_length=1, max_length=128)], Annotated[str, Field(max_length=512)]] = (
        Field(default_factory=dict, max_length=32, description="Run tags (at most 32 pairs).")
    )


class MlflowEntry(_Strict):
    type: Literal["mlflow"]
    mlflow: MlflowIntegration = Field(default_factory=MlflowIntegration)


class TensorboardEntry(_Strict):
    """TensorBoard event files of the run, stored as the job's artifact `tensorboard`."""

    type: Literal["tensorboard"]


Integration = Annotated[WandbEntry | MlflowEntry | TensorboardEntry, Field(discriminator="type")]
INTEGRATION_MODELS: dict[str, type[_Strict]] = {
    "wandb": WandbEntry,
    "mlflow": MlflowEntry,
    "tensorboard": TensorboardEntry,
}


class ContinueSpec(_Strict):
    """How a job continued from a fine-tuned model or checkpoint (`model`) takes over its state."""

    optimizer_state: bool = Field(
        False,
        description="Also resume the optimizer and learning-rate scheduler state of the checkpoint "
        "named by `model` (a true continuation); default: fresh optimizer state.",
    )


class EvaluationSpec(_Strict):
    """Graded generations on the validation file's items at every checkpoint and at the end (and
    once from the base model with `compare_base`): the mean reward is the job's `eval_score`.

    For a chat line the prompt is its messages before the last assistant message, and the grader
    reads `{{item.reference}}` (that message's content) and `{{item.<field>}}` for every other
    top-level field of the line; prompt/completion lines give `reference` = the completion,
    preference lines the preferred answer."""

    grader: dict[str, Any] = Field(
        ...,
        description="An OpenAI grader (string_check, text_similarity, multi, python, score_model) "
        "that reads {{sample.output_text}} and {{item.reference}}.",
    )
    max_samples: Annotated[int, Field(ge=1, le=1000)] = Field(
        50, description="Validation items graded (the first N lines of the validation file)."
    )
    max_new_tokens: Annotated[int, Field(ge=1, le=4096)] = Field(
        256, description="Most tokens generated per answer (greedy)."
    )
    compare_base: bool = Field(
        True, description="Also grade the starting model once: `base_eval_score` beside `eval_score`."
    )

    @field_validator("grader")
    @classmethod
    def _valid_grader(cls, grader: dict[str, Any]) -> dict[str, Any]:
        """A bad grader is an error at its own field (`evaluation.grader.operation`)."""
        from tuneforge.graders.schema import GraderError, parse_grader

        try:
            parse_grader(grader)
        except GraderError as exc:
            where = exc.param.split(".")[1:]
            message = exc.message.removeprefix(f"Invalid value for '{exc.param}': ").removesuffix(".")
            detail = PydanticCustomError("invalid_grader", "{message}", {"message": message})
            raise ValidationError.from_exception_data(
                "grader", [InitErrorDetails(type=detail, loc=tuple(where), input=grader)]
            ) from None
        return grader


ExportKind = Literal["merged", "gguf", "gguf_q8_0"]
MAX_INTEGRATIONS = 8
MAX_INTEGRATION_BYTES = 8 << 10


class JobSpec(_Strict):
    """What a client asks for in `POST /v1/fine_tuning/jobs`, validated.

    The API checks what needs the database (files exist in the project, the model is on offer)
    on top of this model; this model checks everything that can be judged from the body alone.
    """

    model_config = ConfigDict(
        extra="forbid", validate_by_name=True, validate_by_alias=True, serialize_by_alias=True
    )

    model: str = Field(
        ...,
        min_length=1,
        max_length=512,
        description="A base model id from GET /v1/models, or a fine-tuned model (`ft:...`) or "
        "checkpoint (`ft:...:ckpt-step-N`) of your project to continue from.",
    )
    training_file: str = Field(
        ..., min_length=1, max_length=64, description="Id of an uploaded training file."
    )
    validation_file: Annotated[str, Field(max_length=64)] | None = Field(
        None, description="Id of an uploaded validation file."
    )
    suffix: Annotated[str, Field(min_length=1, max_length=64)] | None = Field(
        None, description="Up to 64 characters added to the fine-tuned model's name."
    )
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = Field(None, description="Random seed.")
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None = (
        Field(None, max_length=16, description="Up to 16 string pairs for your own bookkeeping.")
    )
    method: Method = Field(default_factory=Method)
    adapter: AdapterSpec = Field(default_factory=AdapterSpec)
    export: list[ExportKind] = Field(
        default_factory=list,
        description='["merged"] adds a merged model; "gguf" (f16) or "gguf_q8_0" adds the merged model in '
        "GGUF (llama.cpp, Ollama) with an Ollama Modelfile.",
    )
    integrations: list[Integration] | None = Field(
        None,
        max_length=MAX_INTEGRATIONS,
        description="Experiment trackers the run logs to (per-step metrics, parameters, the adapter): "
        f"`wandb`, `mlflow`, `tensorboard`; at most {MAX_INTEGRATIONS}. One the service has not "
        "configured is refused.",
    )
    queue: str | None = Field(
        None, description="Worker queue (GPU class) to run on; default is the service's default queue."
    )
    hardware: HardwareSpec | None = Field(
        None,
        description="Devices per run and how the model is spread over them (DDP or FSDP); default: one.",
    )
    evaluation: EvaluationSpec | None = Field(
        None,
        description="Graded generations on the validation file at each checkpoint and at the end "
        "(`eval_score`, `base_eval_score`); needs a validation_file.",
    )
    continue_: ContinueSpec | None = Field(
        None,
        alias="continue",
        description="Only with a fine-tuned `model`: what to take over from it besides its weights.",
    )

    @field_validator("integrations", mode="before")
    @classmethod
    def _integrations_by_type(cls, value: Any) -> Any:
        """Each item is checked as the model its `type` names, so an error is at
        `integrations[i].type` or `integrations[i].wandb.project`, never at a union member."""
        if not isinstance(value, list):
            return value
        checked: list[Any] = []
        for i, item in enumerate(value):
            kind = item.get("type") if isinstance(item, dict) else None
            model = INTEGRATION_MODELS.get(kind) if isinstance(kind, str) else None
            if model is None:
                detail = PydanticCustomError(
                    "integration_type",
                    "type must be one of {types}",
                    {"types": ", ".join(INTEGRATION_MODELS)},
                )
                raise ValidationError.from_exception_data(
                    "integrations", [InitErrorDetails(type=detail, loc=(i, "type"), input=kind)]
                )
            try:
                checked.append(model.model_validate(item))
            except ValidationError as exc:
                errors = [
                    InitErrorDetails(
                        type=PydanticCustomError("integration", "{message}", {"message": e["msg"]}),
                        loc=(i, *e["loc"]),
                        input=e.get("input"),
                    )
                    for e in exc.errors()
                ]
                raise ValidationError.from_exception_data("integrations", errors) from None
        return checked

    @model_validator(mode="after")
    def _evaluation_needs_validation_items(self) -> JobSpec:
        if self.evaluation is None:
            return self
        problem = None
        if self.validation_file is None:
            problem = (
                "validation_file",
                "evaluation grades answers to the validation file's items; give one",
            )
        elif self.method.type == "pretraining":
            problem = ("evaluation", "evaluation needs prompts to answer; pretraining data has none")
        if problem is not None:
            detail = PydanticCustomError("evaluation", problem[1])
            raise ValidationError.from_exception_data(
                "JobSpec", [InitErrorDetails(type=detail, loc=(problem[0],), input=None)]
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _legacy_hyperparameters(cls, data: Any) -> Any:
        """OpenAI's deprecated top-level `hyperparameters` means the supervised ones."""
        if isinstance(data, dict) and data.get("hyperparameters") is not None:
            data = dict(data)
            legacy = data.pop("hyperparameters")
            method = dict(data.get("method") or {"type": "supervised"})
            section = method.get("type", "supervised")
            method.setdefault(section, {})
            method[section] = {**method[section], "hyperparameters": legacy}
            data["method"] = method
        elif isinstance(data, dict) and "hyperparameters" in data:
            data = {k: v for k, v in data.items() if k != "hyperparameters"}
        return data

    @property
    def hyperparameters(self) -> Hyperparameters:
        return self.method.hyperparameters
