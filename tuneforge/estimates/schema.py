"""Request and response of the cost calculator. The API validates `POST /v1/fine_tuning/estimates`
bodies with `EstimateRequest` and answers an `EstimateResponse`; the CLI builds the same request."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from tuneforge.models.spec import AdapterSpec, Hyperparameters, MethodType, ReinforcementHyperparameters

Dtype = Literal["bf16", "fp16", "fp32"]
#: Bounds of the data-size inputs: far beyond any fine-tuning set, well inside float arithmetic.
MAX_TOKENS = 10**14
MAX_EXAMPLES = 10**12
#: A `model_config` is a config.json: small and shallow.
MAX_MODEL_CONFIG_BYTES = 64 * 1024
MAX_MODEL_CONFIG_DEPTH = 8


class EstimateError(ValueError):
    """Bad input to the calculator; `param` names the offending field by its dotted path."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class Hardware(BaseModel):
    """Where the job would run: a known class (`{"gpu": "a100-80gb"}`, `{"gpu": "cpu"}`) or a
    memory size (`{"gpu_memory_gb": 24, "count": 1}`). `fits` compares the per-device total with
    one device's memory: a whole replica per device under DDP, a 1/count share of weights,
    gradients and optimizer state (plus the layer being gathered) under FSDP. The job's
    `batch_size` is the global batch: each device takes its share of it."""

    model_config = ConfigDict(extra="forbid")

    gpu: str | None = Field(None, description="Hardware class, e.g. a100-80gb, h100-80gb, l4, cpu.")
    gpu_memory_gb: Annotated[float, Field(gt=0, le=4096)] | None = Field(
        None, description="Memory of one device in GB (10^9 bytes); overrides the class's figure."
    )
    count: Annotated[int, Field(ge=1, le=1024)] = Field(1, description="Devices (data parallel).")
    strategy: Literal["auto", "ddp", "fsdp"] = Field(
        "auto",
        description="With count > 1: `ddp` keeps a whole replica per device, `fsdp` shards weights, "
        "gradients and optimizer state over the devices; `auto` is fsdp for full fine-tuning, else ddp.",
    )


#: Knobs only a reinforcement run has (its sampling and KL term); any other method refuses them.
REINFORCEMENT_ONLY = set(ReinforcementHyperparameters.model_fields) - set(Hyperparameters.model_fields)


class EstimateHyperparameters(ReinforcementHyperparameters):
    """The job's hyperparameters. `num_generations`, `compute_multiplier`, `max_new_tokens` and
    `beta` (with `method: reinforcement` only) size a GRPO run: sampled answers per prompt, their
    length, and whether a KL reference model is kept."""


class FileStats(BaseModel):
    """What the upload recorded about a training file."""

    examples: int | None = None
    approx_tokens: int | None = None
    format: str | None = None


class EstimateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), populate_by_name=True)

    model: str | None = Field(None, description="A base model id on offer (GET /v1/models).")
    model_config_: dict[str, Any] | None = Field(
        None,
        alias="model_config",
        description="A Hugging Face config.json as a dict; for models whose weights are not here.",
    )
    adapter: AdapterSpec = Field(default_factory=AdapterSpec)
    method: MethodType = Field(
        "supervised",
        description="A method.type: supervised, dpo, pretraining, reinforcement, orpo, simpo, kto "
        "or reward_model.",
    )
    training_file: str | None = Field(None, description="An uploaded file; its recorded counts are used.")
    n_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS)] | None = Field(
        None, description="Tokens in one epoch (at most 10^14)."
    )
    n_examples: Annotated[int, Field(ge=1, le=MAX_EXAMPLES)] | None = Field(
        None, description="Examples in one epoch (at most 10^12)."
    )
    data_format: Annotated[str, Field(max_length=64)] | None = Field(
        None, description="Detected format of the data (e.g. openai_preference); from the file if given."
    )
    domain_shift: bool = Field(
        False, description="The data is from a domain the base model has barely seen (new language, field)."
    )
    hyperparameters: EstimateHyperparameters = Field(default_factory=EstimateHyperparameters)
    hardware: Hardware | None = Field(None, description="Where it would run; default: no fit check.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward.")
    dtype: Dtype | None = Field(None, description="Weights/compute dtype; default fp32 on CPU, bf16 on GPUs.")

    @model_validator(mode="before")
    @classmethod
    def _method_object(cls, data: Any) -> Any:
        """Accept OpenAI's `method` object ({"type": ..., "<type>": {"hyperparameters": ...}})."""
        if isinstance(data, dict) and isinstance(data.get("method"), dict):
            data = dict(data)
            method = data["method"]
            kind = method.get("type", "supervised")
            data["method"] = kind
            section = method.get(kind) or {}
            if isinstance(section, dict) and "hyperparameters" in section and "hyperparameters" not in data:
                hp = dict(section["hyperparameters"] or {})
                if kind != "reinforcement":  # the preference methods' beta changes no memory
                    hp.pop("beta", None)
                data["hyperparameters"] = hp
        return data

    @field_validator("model_config_")
    @classmethod
    def _small_config(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return value
        if _depth(value) > MAX_MODEL_CONFIG_DEPTH:
            raise ValueError(f"a config nests at most {MAX_MODEL_CONFIG_DEPTH} levels deep")
        try:
            size = len(json.dumps(value, allow_nan=False))
        except ValueError:
            raise ValueError("numbers in a config must be finite") from None
        if size > MAX_MODEL_CONFIG_BYTES:
            raise ValueError(f"a config is at most {MAX_MODEL_CONFIG_BYTES} bytes as JSON")
        return value

    @model_validator(mode="after")
    def _one_model(self) -> EstimateRequest:
        if (self.model is None) == (self.model_config_ is None):
            raise ValueError("give exactly one of model (an id) or model_config (a config dict)")
        return self

    @model_validator(mode="after")
    def _sampling_knobs_need_reinforcement(self) -> EstimateRequest:
        """A reinforcement knob on another method is refused at its field, as the job spec does."""
        if self.method == "reinforcement":
            return self
        for name in sorted(REINFORCEMENT_ONLY & self.hyperparameters.model_fields_set):
            detail = PydanticCustomError(
                "extra_forbidden", "{name} is a reinforcement setting", {"name": name}
            )
            raise ValidationError.from_exception_data(
                type(self).__name__,
                [InitErrorDetails(type=detail, loc=("hyperparameters", name), input=self.hyperparameters)],
            )
        return self


def _depth(value: Any, level: int = 0) -> int:
    """Nesting depth of a JSON value, stopping one past the limit (so it is cheap on deep input)."""
    if level > MAX_MODEL_CONFIG_DEPTH:
        return level
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level + 1)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level + 1)
    return level


class Memory(BaseModel):
    """Bytes per device, by part."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    total: int


class Throughput(BaseModel):
    hardware: str
    tokens_per_second: float
    source: str


class Recommendation(BaseModel):
    method: MethodType
    adapter: str
    stages: list[str] = Field(description="Methods to run in order, e.g. pretraining then supervised.")
    reasons: list[str]
    fit_advice: list[str] = Field(description="Changes that make the job fit, each checked by the model.")


class EstimateResponse(BaseModel):
    object: Literal["fine_tuning.estimate"] = "fine_tuning.estimate"
    model: str | None
    architecture: str
    adapter: AdapterSpec
    method: MethodType
    trainable_params: int
    total_params: int
    trainable_percent: float
    dtype: Dtype
    memory: Memory
    memory_notes: list[str]
    batch_size: int
    seq_len: int
    n_epochs: int
    tokens_per_epoch: int | None
    steps: int | None
    estimated_seconds: float | None
    throughput: Throughput | None
    hardware: str | None
    device_memory_bytes: int | None
    fits: bool | None
    recommendation: Recommendation
