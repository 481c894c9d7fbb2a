"""Exact parameter counts from a config alone: the model is built on the meta device (no weights,
no download), the PEFT config is applied with `peft.get_peft_model`, and the counts are PEFT's own
`get_nb_trainable_parameters`. Results are cached per (config, adapter): a warm estimate for an 8B
config costs a dictionary lookup.

Builds of different configs run side by side: each cache key is built once at a time (callers
asking for a key being built wait for that build, callers asking for other keys do not), and a
build that runs past its time budget stops with an `EstimateError` (the module-registration hook
below checks the clock each time a layer is added to the skeleton).
"""

from __future__ import annotations

import json
import math
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

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
#: The build's cost grows with the layer count (about 25 ms a layer on one core); the largest
#: published decoders have fewer than 130 layers and 256k-token vocabularies.
FIELD_LIMITS = {
    "vocab_size": 1_048_576,
    "hidden_size": 65_536,
    "num_hidden_layers": 256,
    "num_attention_heads": 1_024,
    "intermediate_size": 524_288,
}
#: Bounds on optional fields, checked when a config has them (mixture-of-experts and attention).
OPTIONAL_FIELD_LIMITS = {
    "num_key_value_heads": 1_024,
    "head_dim": 4_096,
    "num_local_experts": 1_024,
    "num_experts": 1_024,
    "n_routed_experts": 1_024,
    "num_experts_per_tok": 64,
    "moe_intermediate_size": 524_288,
    "max_position_embeddings": 16_777_216,
}
#: RoPE scaling kinds transformers knows (`rope_scaling.type` / `rope_type`); checked against the
#: installed transformers when it has the table.
DEFAULT_ROPE_TYPES = frozenset({"default", "linear", "dynamic", "yarn", "longrope", "llama3"})
#: Modules one skeleton may register (a 256-layer model registers about 4,000).
MAX_MODULES = 200_000
#: Built skeletons and adapter counts kept (least recently used dropped first).
SHAPE_CACHE_SIZE = 64
COUNTS_CACHE_SIZE = 256

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


class BuildTimeout(EstimateError):
    """A skeleton build ran past its time budget (`TUNEFORGE_ESTIMATE_BUILD_SECONDS`)."""


_quiet_lock = threading.Lock()
_quiet_depth = 0
_quiet_saved: tuple[int, list[Any]] | None = None


@contextmanager
def _quiet() -> Iterator[None]:
    """transformers' logging and Python's warnings off while any build runs. Both are process-wide
    state, so concurrent builds share one quiet period: the first in turns them off, the last out
    restores them (`warnings.catch_warnings` per thread would restore them out of order)."""
    global _quiet_depth, _quiet_saved
    from transformers.utils import logging as hf_logging

    with _quiet_lock:
        if _quiet_depth == 0:
            _quiet_saved = (hf_logging.get_verbosity(), list(warnings.filters))
            hf_logging.set_verbosity_error()
            warnings.simplefilter("ignore")
        _quiet_depth += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0 and _quiet_saved is not None:
                level, filters = _quiet_saved
                hf_logging.set_verbosity(level)
                warnings.filters[:] = filters  # type: ignore[index]
                warnings._filters_mutated()  # type: ignore[attr-defined]
                _quiet_saved = None


# --- the time budget of a build ----------------------------------------------------------------

_budget = threading.local()
_hook_lock = threading.Lock()
_hook_installed = False


@dataclass
class _Budget:
    deadline: float
    seconds: float
    param: str
    modules: int = 0


def _on_module_registered(module: Any, name: str, submodule: Any) -> None:
    budget: _Budget | None = getattr(_budget, "current", None)
    if budget is None:
        return None
    budget.modules += 1
    if budget.modules > MAX_MODULES:
        raise EstimateError(
            f"{budget.param} describes a model of more than {MAX_MODULES:,} modules; "
            "this calculator builds smaller ones",
            budget.param,
        )
    if time.monotonic() > budget.deadline:
        raise BuildTimeout(
            f"building {budget.param} took longer than this service's budget of {budget.seconds:g} s "
            "per estimate; give a smaller config",
            budget.param,
        )
    return None


def _install_budget_hook() -> None:
    global _hook_installed
    with _hook_lock:
        if _hook_installed:
            return
        from torch.nn.modules.module import register_module_module_registration_hook

        register_module_module_registration_hook(_on_module_registered)
        _hook_installed = True


@contextmanager
def time_budget(seconds: float | None, param: str) -> Iterator[None]:
    """Stops builds in this thread once they have run `seconds` (None or 0: no limit). Nested
    budgets keep the earlier deadline: an estimate's budget covers every build it makes."""
    if not seconds:
        yield
        return
    _install_budget_hook()
    previous: _Budget | None = getattr(_budget, "current", None)
    deadline = time.monotonic() + seconds
    if previous is not None and previous.deadline <= deadline:
        yield
        return
    _budget.current = _Budget(deadline, seconds, param)
    try:
        yield
    finally:
        _budget.current = previous


# --- single-flight cache -----------------------------------------------------------------------


class EstimateBusy(EstimateError):
    """Every build slot of this process is taken; the request may be retried shortly."""

    retry_after = 5


class BuildSlots:
    """How many threads of this process may build skeletons or wait for one at once
    (`TUNEFORGE_ESTIMATE_CONCURRENT_BUILDS`; 0: no limit). Cache hits take no slot, so however
    many tenants send new configs, the other API threads stay free for everything else."""

    def __init__(self, limit: int = 2) -> None:
        self.limit = limit
        self._used = 0
        self._lock = threading.Lock()

    @contextmanager
    def take(self) -> Iterator[None]:
        with self._lock:
            if self.limit and self._used >= self.limit:
                raise EstimateBusy(
                    f"this service is building {self._used} other model skeletons; try again in a few "
                    "seconds (an estimate for a model it has built before answers at once)",
                    None,
                )
            self._used += 1
        try:
            yield
        finally:
            with self._lock:
                self._used -= 1


build_slots = BuildSlots()

K = TypeVar("K")
V = TypeVar("V")


class _Flight(Generic[V]):
    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: V | None = None
        self.error: EstimateError | None = None


class SingleFlightCache(Generic[K, V]):
    """An LRU cache whose misses are built once per key at a time: a caller asking for a key that
    is being built waits for that build; callers asking for other keys go on. Bad input
    (`EstimateError`) is remembered like a result, so asking again with the same config costs a
    lookup, not another build; a build that ran out of time is not (the next request has its own
    budget). The lock is held only for dictionary work."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._lock = threading.Lock()
        self._done: OrderedDict[K, tuple[V | None, EstimateError | None]] = OrderedDict()
        self._running: dict[K, _Flight[V]] = {}

    def get(self, key: K, build: Callable[[], V]) -> V:
        with self._lock:
            if key in self._done:
                self._done.move_to_end(key)
                value, error = self._done[key]
                return self._result(value, error)
        with build_slots.take():  # a miss builds or waits for a build: it holds an API thread
            return self._build_or_wait(key, build)

    def _build_or_wait(self, key: K, build: Callable[[], V]) -> V:
        while True:
            with self._lock:
                if key in self._done:
                    self._done.move_to_end(key)
                    value, error = self._done[key]
                    return self._result(value, error)
                flight = self._running.get(key)
                if flight is None:
                    flight = self._running[key] = _Flight()
                    break
            flight.done.wait()
            if flight.value is not None or flight.error is not None:
                return self._result(flight.value, flight.error)
            # the build raised something unexpected: try it here (the error reaches this caller too)
        try:
            flight.value = build()
        except EstimateError as exc:
            flight.error = exc
        finally:
            with self._lock:
                del self._running[key]
                # A timeout depends on the budget left to the request that built, not on the key.
                if flight.value is not None or (
                    flight.error is not None and not isinstance(flight.error, BuildTimeout)
                ):
                    self._done[key] = (flight.value, flight.error)
                    while len(self._done) > self.maxsize:
                        self._done.popitem(last=False)
            flight.done.set()
        return self._result(flight.value, flight.error)

    @staticmethod
    def _result(value: V | None, error: EstimateError | None) -> V:
        if error is not None:
            raise type(error)(error.message, error.param)
        assert value is not None
        return value

    def clear(self) -> None:
        with self._lock:
            self._done.clear()

    def __len__(self) -> int:
        return len(self._done)


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
    values: dict[str, int] = {}
    for field in required:
        spelled = aliases.get(field, field)
        if field not in config and spelled not in config:
            raise EstimateError(f"{param} is missing {spelled!r}", f"{param}.{spelled}")
        values[field] = _bounded_int(
            config.get(field, config.get(spelled)), FIELD_LIMITS[field], param, spelled
        )
    for field, limit in OPTIONAL_FIELD_LIMITS.items():
        spelled = aliases.get(field, field)
        value = config.get(field, config.get(spelled))
        if value is not None:
            values[field] = _bounded_int(value, limit, param, spelled)
    _check_attention(values, param, aliases)
    for name in ("rope_scaling", "rope_parameters"):
        _check_rope(config.get(name), f"{param}.{name}")
    # No remote code: `auto_map` would point transformers at code shipped with a checkpoint.
    kwargs = {k: v for k, v in config.items() if k not in ("model_type", "auto_map")}
    try:
        with _quiet():
            return config_class(**kwargs)
    except Exception as exc:  # TypeError, ValueError, huggingface_hub's strict-dataclass errors...
        raise EstimateError(f"{param} is not a valid {model_type} config: {exc}", param) from exc


def _bounded_int(value: Any, limit: int, param: str, field: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise EstimateError(f"{param}.{field} must be a positive integer", f"{param}.{field}")
    if value > limit:
        raise EstimateError(
            f"{param}.{field} = {value:,} is larger than any model this calculator builds "
            f"(at most {limit:,})",
            f"{param}.{field}",
        )
    return value


def _check_attention(values: dict[str, int], param: str, aliases: dict[str, str]) -> None:
    """Head counts that the attention layers can be built from: without `head_dim` the heads
    split `hidden_size` evenly; key/value heads are a divisor of the query heads."""
    heads = values["num_attention_heads"]
    hidden = values["hidden_size"]
    spelled = aliases.get("num_attention_heads", "num_attention_heads")
    if "head_dim" not in values and hidden % heads:
        raise EstimateError(
            f"{param}.{spelled} = {heads} does not divide hidden_size = {hidden}; give head_dim or "
            "a head count that divides it",
            f"{param}.{spelled}",
        )
    kv_heads = values.get("num_key_value_heads")
    if kv_heads is not None and (kv_heads > heads or heads % kv_heads):
        raise EstimateError(
            f"{param}.num_key_value_heads = {kv_heads} must divide {spelled} = {heads}",
            f"{param}.num_key_value_heads",
        )


def rope_types() -> frozenset[str]:
    try:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    except ImportError:
        return DEFAULT_ROPE_TYPES
    return frozenset(ROPE_INIT_FUNCTIONS) | {"default"}


def _check_rope(rope: Any, param: str) -> None:
    if rope is None:
        return
    if not isinstance(rope, dict):
        raise EstimateError(f"{param} must be an object", param)
    for key in ("rope_type", "type"):
        kind = rope.get(key)
        if kind is None:
            continue
        known = rope_types()
        if not isinstance(kind, str) or kind not in known:
            raise EstimateError(
                f"{param}.{key} {kind!r} is not a RoPE scaling kind transformers knows: {sorted(known)}",
                f"{param}.{key}",
            )
    for key, value in rope.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise EstimateError(f"{param}.{key} must be a finite number", f"{param}.{key}")


def _build_meta(config: Any) -> torch.nn.Module:
    import torch
    from transformers import AutoModelForCausalLM

    with _quiet(), torch.device("meta"):
        model: torch.nn.Module = AutoModelForCausalLM.from_config(config)
    # Tied here rather than by transformers: its from_pretrained makes `tie_weights` a no-op on the
    # class while it loads, so a build beside a load in another thread (the engine, a test) came
    # out untied and counted the output head twice.
    if getattr(config, "tie_word_embeddings", False):
        built: Any = model
        inputs, outputs = built.get_input_embeddings(), built.get_output_embeddings()
        if inputs is not None and outputs is not None and outputs.weight is not inputs.weight:
            outputs.weight = inputs.weight
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


_shapes: SingleFlightCache[tuple[str, str], tuple[ModelShape, Any]] = SingleFlightCache(SHAPE_CACHE_SIZE)
_adapter_counts: SingleFlightCache[tuple[str, str, str], AdapterCounts] = SingleFlightCache(COUNTS_CACHE_SIZE)
#: Seconds one build may take when the caller gives no budget (the calculator passes
#: `TUNEFORGE_ESTIMATE_BUILD_SECONDS`).
DEFAULT_BUILD_SECONDS = 15.0


def import_stack() -> None:
    """torch, transformers and PEFT, imported before a build's clock starts."""
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401


def _shape(key: str, param: str, seconds: float | None) -> tuple[ModelShape, Any]:
    def build() -> tuple[ModelShape, Any]:
        import_stack()
        with time_budget(seconds, param):
            return _build_shape(key, param)

    return _shapes.get((key, param), build)


def _build_shape(key: str, param: str) -> tuple[ModelShape, Any]:
    raw = json.loads(key)
    config = validate_config(raw, param)
    try:
        model = _build_meta(config)
    except EstimateError:
        raise
    except Exception as exc:  # transformers' own consistency checks, in whatever type they raise
        raise EstimateError(f"{param} is not a valid {raw.get('model_type')} config: {exc}", param) from exc
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


def model_shape(
    config: dict[str, Any], param: str = "model_config", budget_seconds: float | None = DEFAULT_BUILD_SECONDS
) -> ModelShape:
    """The shape of the model a config describes; its build stops after `budget_seconds`."""
    return _shape(config_key(config), param, budget_seconds)[0]


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


def _counts(key: str, param: str, adapter_json: str, seconds: float | None) -> AdapterCounts:
    shape, config = _shape(key, param, seconds)

    def build() -> AdapterCounts:
        with time_budget(seconds, param):
            return _build_counts(shape, config, AdapterSpec.model_validate_json(adapter_json))

    return _adapter_counts.get((key, param, adapter_json), build)


def _build_counts(shape: ModelShape, config: Any, adapter: AdapterSpec) -> AdapterCounts:
    if adapter.type == "full":
        return AdapterCounts(shape.total_params, shape.total_params, ())
    from peft import get_peft_model

    model = _build_meta(config)
    check_targets(shape, adapter, [n for n, _ in model.named_modules()])
    try:
        with _quiet():
            peft_model = get_peft_model(model, peft_config(adapter, model))
    except EstimateError:
        raise
    except (ValueError, TypeError, KeyError) as exc:
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
    config: dict[str, Any],
    adapter: AdapterSpec,
    param: str = "model_config",
    budget_seconds: float | None = DEFAULT_BUILD_SECONDS,
) -> AdapterCounts:
    """Trainable and total parameters as PEFT counts them, for a config dict and an adapter."""
    return _counts(config_key(config), param, adapter.model_dump_json(), budget_seconds)


def clear_cache() -> None:
    """Forget built skeletons (the benchmark's cold baseline)."""
    _shapes.clear()
    _adapter_counts.clear()
