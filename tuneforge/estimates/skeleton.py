"""Exact parameter counts from a config alone: the model is built on the meta device (no weights,
no download), the PEFT config is applied with `peft.get_peft_model`, and the counts are PEFT's own
`get_nb_trainable_parameters`. Results are cached per (config, adapter): a warm estimate for an 8B
config costs a dictionary lookup.
"""

from __future__ import annotations

import json
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from tuneforge.estimates.schema import EstimateError
from tuneforge.models.spec import AdapterSpec

if TYPE_CHECKING:
    import torch

#: Config fields every causal LM needs, by their transformers name (an architecture may spell
#: them differently, e.g. GPT-2's n_embd; its `attribute_map` says so).
REQUIRED_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
#: Required as well when the architecture's config class has the field (Llama, Qwen, Mistral...).
REQUIRED_IF_KNOWN = ("intermediate_size",)

#: Upper bounds that keep a meta build cheap (a bigger config is a typo or an attack, not a model).
FIELD_LIMITS = {
    "vocab_size": 4_000_000,
    "hidden_size": 131_072,
    "num_hidden_layers": 512,
    "num_attention_heads": 4_096,
    "intermediate_size": 1_048_576,
}

GATE_NAMES = frozenset({"gate_proj", "gate_up_proj", "w1", "w3", "gate"})
#: Leaf names of linear layers that read the same input tensor inside one block.
SHARED_INPUT_GROUPS = (
    frozenset({"q_proj", "k_proj", "v_proj"}),
    frozenset({"gate_proj", "up_proj"}),
    frozenset({"w1", "w3"}),
)


@dataclass(frozen=True)
class Linear:
    name: str  # full module path
    in_features: int
    out_features: int

    @property
    def leaf(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class ModelShape:
    """What the memory model needs to know about an architecture, read off the meta skeleton."""

    model_type: str
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    tied_embeddings: bool
    gated_mlp: bool
    total_params: int
    linear_params: int  # weights of every linear layer but the output head (what 4-bit quantizes)
    linear_bias_params: int
    output_head: str | None
    linears: tuple[Linear, ...]  # every linear layer, output head included
    layer_linears: tuple[Linear, ...]  # those of the first decoder layer
    norms_per_layer: int

    @property
    def linear_leaf_names(self) -> list[str]:
        return sorted({lin.leaf for lin in self.linears})

    @property
    def largest_linear(self) -> int:
        return max((lin.numel for lin in self.linears if lin.name != self.output_head), default=0)


@dataclass(frozen=True)
class AdapterCounts:
    trainable_params: int
    total_params: int
    adapted: tuple[Linear, ...]  # modules the adapter wraps (LoRA/DoRA/IA3)
    feedforward: tuple[str, ...] = ()  # IA3 modules that scale their input, not their output


_lock = threading.Lock()


@contextmanager
def _quiet() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)


def config_key(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, default=str)


def validate_config(config: dict[str, Any], param: str) -> Any:
    """A transformers `PretrainedConfig` from a config dict, or an `EstimateError` naming the field."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise EstimateError(f"{param}.model_type is required (e.g. 'llama')", f"{param}.model_type")
    if model_type not in CONFIG_MAPPING:
        raise EstimateError(
            f"unknown architecture {model_type!r} in {param}.model_type", f"{param}.model_type"
        )
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise EstimateError(
            f"architecture {model_type!r} has no causal language model in transformers",
            f"{param}.model_type",
        )
    config_class = CONFIG_MAPPING[model_type]
    aliases: dict[str, str] = dict(getattr(config_class, "attribute_map", {}) or {})
    with _quiet():
        defaults = config_class()
    required = list(REQUIRED_FIELDS) + [
        f for f in REQUIRED_IF_KNOWN if f in defaults.to_dict() and getattr(defaults, f, None) is not None
    ]
    for field in required:
        spelled = aliases.get(field, field)
        if field not in config and spelled not in config:
            raise EstimateError(f"{param} is missing {spelled!r}", f"{param}.{spelled}")
        value = config.get(field, config.get(spelled))
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise EstimateError(f"{param}.{spelled} must be a positive integer", f"{param}.{spelled}")
        if value > FIELD_LIMITS[field]:
            raise EstimateError(
                f"{param}.{spelled} = {value:,} is larger than any model this calculator builds "
                f"(at most {FIELD_LIMITS[field]:,})",
                f"{param}.{spelled}",
            )
    # No remote code: `auto_map` would point transformers at code shipped with a checkpoint.
    kwargs = {k: v for k, v in config.items() if k not in ("model_type", "auto_map")}
    try:
        with _quiet():
            return config_class(**kwargs)
    except (TypeError, ValueError) as exc:
        raise EstimateError(f"{param} is not a valid {model_type} config: {exc}", param) from exc


def _build_meta(config: Any) -> torch.nn.Module:
    import torch
    from transformers import AutoModelForCausalLM

    with _quiet(), torch.device("meta"):
        model: torch.nn.Module = AutoModelForCausalLM.from_config(config)
    return model


def _linears(model: torch.nn.Module) -> list[Linear]:
    import torch

    found = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            found.append(Linear(name, module.in_features, module.out_features))
        elif type(module).__name__ == "Conv1D":  # GPT-2 family: weight is (in, out)
            weight = module.weight
            found.append(Linear(name, int(weight.shape[0]), int(weight.shape[1])))
    return found


def _output_head(model: torch.nn.Module) -> str | None:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    for name, module in model.named_modules():
        if module is head:
            return name
    return None


@lru_cache(maxsize=64)
def _shape(key: str, param: str) -> tuple[ModelShape, Any]:
    raw = json.loads(key)
    config = validate_config(raw, param)
    model = _build_meta(config)
    linears = _linears(model)
    head = _output_head(model)
    layer_prefix = _first_layer_prefix([lin.name for lin in linears])
    layer_linears = tuple(lin for lin in linears if layer_prefix and lin.name.startswith(layer_prefix))
    linear_names = {lin.name for lin in linears if lin.name != head}
    bias = sum(
        int(m.bias.numel())
        for n, m in model.named_modules()
        if n in linear_names and getattr(m, "bias", None) is not None
    )
    norms = 0
    if layer_prefix:
        for name, module in model.named_modules():
            if name.startswith(layer_prefix) and "norm" in type(module).__name__.lower():
                norms += 1
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    intermediate = int(
        getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    )
    total = sum(p.numel() for p in model.parameters())
    shape = ModelShape(
        model_type=config.model_type,
        architecture=type(model).__name__,
        vocab_size=int(config.vocab_size),
        hidden_size=hidden,
        num_layers=int(config.num_hidden_layers),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate,
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        gated_mlp=any(lin.leaf in GATE_NAMES for lin in layer_linears),
        total_params=int(total),
        linear_params=sum(lin.numel for lin in linears if lin.name != head),
        linear_bias_params=bias,
        output_head=head,
        linears=tuple(linears),
        layer_linears=layer_linears,
        norms_per_layer=norms or 2,
    )
    return shape, config


def _first_layer_prefix(names: list[str]) -> str | None:
    for name in names:
        parts = name.split(".")
        for i, part in enumerate(parts[:-1]):
            if part.isdigit():
                return ".".join(parts[: i + 1]) + "."
    return None


def model_shape(config: dict[str, Any], param: str = "model_config") -> ModelShape:
    with _lock:
        return _shape(config_key(config), param)[0]


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def check_targets(shape: ModelShape, adapter: AdapterSpec, module_names: list[str]) -> None:
    if not isinstance(adapter.target_modules, list):
        return
    missing = [t for t in adapter.target_modules if not any(_matches(n, t) for n in module_names)]
    if missing:
        raise EstimateError(
            f"target_modules {missing} match no module of this {shape.model_type} model; "
            f"its linear modules are {shape.linear_leaf_names}",
            "adapter.target_modules",
        )


def peft_config(adapter: AdapterSpec, model: Any) -> Any:
    """The PEFT config a job with this adapter trains with: the training recipe's own
    (`tuneforge.training.loading.peft_config`), so the counts are those the job will report."""
    from tuneforge.training.loading import peft_config as recipe_peft_config

    return recipe_peft_config(adapter, model)


@lru_cache(maxsize=256)
def _counts(key: str, param: str, adapter_json: str) -> AdapterCounts:
    adapter = AdapterSpec.model_validate_json(adapter_json)
    shape, config = _shape(key, param)
    if adapter.type == "full":
        return AdapterCounts(shape.total_params, shape.total_params, ())
    from peft import get_peft_model

    model = _build_meta(config)
    check_targets(shape, adapter, [n for n, _ in model.named_modules()])
    try:
        with _quiet():
            peft_model = get_peft_model(model, peft_config(adapter, model))
    except ValueError as exc:
        raise EstimateError(
            f"PEFT refused the adapter for this model: {exc}; linear modules are {shape.linear_leaf_names}",
            "adapter.target_modules",
        ) from exc
    trainable, total = peft_model.get_nb_trainable_parameters()
    adapted: list[Linear] = []
    feedforward: list[str] = []
    by_name = {lin.name: lin for lin in shape.linears}
    for name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "lora_A") or hasattr(module, "ia3_l"):
            base = by_name.get(name)
            if base is not None:
                adapted.append(base)
                if getattr(module, "is_feedforward", False):
                    feedforward.append(name)
    return AdapterCounts(int(trainable), int(total), tuple(adapted), tuple(feedforward))


def adapter_counts(
    config: dict[str, Any], adapter: AdapterSpec, param: str = "model_config"
) -> AdapterCounts:
    """Trainable and total parameters as PEFT counts them, for a config dict and an adapter."""
    with _lock:
        return _counts(config_key(config), param, adapter.model_dump_json())


def clear_cache() -> None:
    """Forget built skeletons (the benchmark's cold baseline)."""
    with _lock:
        _shape.cache_clear()
        _counts.cache_clear()
