"""`estimate(request)`: the fine-tuning cost calculator. Parameters exactly as PEFT counts them,
memory by part, tokens, steps and time (only from measured throughput), and a recommendation."""

from __future__ import annotations

import json
import math
from typing import Any

from tuneforge.config import Settings, get_settings
from tuneforge.estimates import hardware as hw
from tuneforge.estimates.advisor import Variant, recommend
from tuneforge.estimates.memory import MemoryBreakdown, memory_breakdown, per_device
from tuneforge.estimates.methods import for_method, sampling
from tuneforge.estimates.schema import (
    EstimateError,
    EstimateRequest,
    EstimateResponse,
    FileStats,
    Memory,
    Throughput,
)
from tuneforge.estimates.skeleton import (
    AdapterCounts,
    adapter_counts,
    build_slots,
    import_stack,
    model_shape,
    time_budget,
)
from tuneforge.models.spec import AdapterSpec
from tuneforge.training import hyperparams as training_hp

#: "auto" with no data size known; with one, the training recipe's own rules
#: (tuneforge.training.hyperparams.auto_batch_size / auto_epochs) resolve it.
AUTO_BATCH_SIZE = 8
AUTO_EPOCHS = 3


def load_model_config(request: EstimateRequest, settings: Settings) -> tuple[dict[str, Any], str]:
    """The config dict to build, and the dotted name of the field it came from."""
    if request.model_config_ is not None:
        return dict(request.model_config_), "model_config"
    from tuneforge.training.base_models import UnknownModel, resolve_model_path

    assert request.model is not None
    try:
        path = resolve_model_path(request.model, settings.models, settings.models_dir)
    except UnknownModel as exc:
        raise EstimateError(
            f"model {request.model!r} is not on offer here; give model_config for others", "model"
        ) from exc
    try:
        config: dict[str, Any] = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise EstimateError(f"model {request.model!r} has no readable config.json: {exc}", "model") from exc
    return config, "model"


def _device(request: EstimateRequest) -> tuple[str | None, int | None, bool]:
    """(hardware class, bytes of one device, is a GPU)."""
    spec = request.hardware
    if spec is None:
        return None, None, True
    name = (spec.gpu or "").strip().lower() or None
    is_gpu = name != "cpu"
    if spec.gpu_memory_gb is not None:
        return name or "custom", int(spec.gpu_memory_gb * hw.GIB), is_gpu
    if name is None:
        raise EstimateError("hardware needs gpu (a class) or gpu_memory_gb", "hardware")
    if name == "cpu":
        return name, None, False
    if name not in hw.DEVICE_MEMORY_GIB:
        raise EstimateError(
            f"unknown hardware class {name!r}; known: {sorted(hw.DEVICE_MEMORY_GIB)} and cpu, "
            "or give gpu_memory_gb",
            "hardware.gpu",
        )
    return name, int(hw.DEVICE_MEMORY_GIB[name] * hw.GIB), True


def estimate(
    request: EstimateRequest, *, file_stats: FileStats | None = None, settings: Settings | None = None
) -> EstimateResponse:
    settings = settings or get_settings()
    config, param = load_model_config(request, settings)
    budget = settings.estimate_build_seconds or None
    build_slots.limit = settings.estimate_concurrent_builds
    import_stack()  # before the clock starts: a cold process imports for seconds
    with time_budget(budget, param):  # one budget for every build of this estimate (variants too)
        return _estimate(request, file_stats, config, param, budget)


def _estimate(
    request: EstimateRequest,
    file_stats: FileStats | None,
    config: dict[str, Any],
    param: str,
    budget: float | None,
) -> EstimateResponse:
    shape = model_shape(config, param, budget)
    adapter = request.adapter
    counts = adapter_counts(config, adapter, param, budget)

    hp = request.hyperparameters
    stats = file_stats or FileStats()
    n_examples = request.n_examples or stats.examples
    n_tokens = request.n_tokens or stats.approx_tokens
    data_format = request.data_format or stats.format
    seq_len = hp.max_seq_length
    accumulation = hp.gradient_accumulation_steps
    # Rows the trainer iterates: examples, or packed sequences when only a token count is known.
    rows = n_examples if n_examples is not None else (math.ceil(n_tokens / seq_len) if n_tokens else None)
    if isinstance(hp.batch_size, int):
        batch_size = hp.batch_size
    else:
        batch_size = training_hp.auto_batch_size(rows) if rows else AUTO_BATCH_SIZE
    if isinstance(hp.n_epochs, int):
        n_epochs = hp.n_epochs
    else:
        n_epochs = training_hp.auto_epochs(rows) if rows else AUTO_EPOCHS
    hardware_name, device_bytes, is_gpu = _device(request)
    dtype = request.dtype or ("bf16" if is_gpu else "fp32")
    devices = request.hardware.count if request.hardware else 1
    asked = request.hardware.strategy if request.hardware else "auto"

    def strategy(variant_adapter: AdapterSpec) -> str:
        return asked if asked != "auto" else ("fsdp" if variant_adapter.type == "full" else "ddp")

    def breakdown(
        variant_adapter: AdapterSpec,
        variant_counts: AdapterCounts,
        variant_batch: int,
        variant_seq_len: int,
        variant_accumulation: int,
        checkpointing: bool,
    ) -> MemoryBreakdown:
        # batch_size is the global batch (tuneforge.training.distributed): each device takes its share.
        micro_batch = math.ceil(variant_batch / devices)
        rft = None
        if request.method == "reinforcement":  # each prompt's answers are sequences of their own
            rft = sampling(
                hp, prompts=micro_batch, seq_len=variant_seq_len, accumulation=variant_accumulation
            )
        memory = per_device(
            memory_breakdown(
                shape,
                variant_adapter,
                variant_counts,
                dtype=dtype,
                micro_batch=micro_batch if rft is None else rft.sequences,
                seq_len=variant_seq_len if rft is None else rft.tokens,
                gradient_checkpointing=checkpointing,
                is_gpu=is_gpu,
                head_tokens=None if rft is None else rft.logit_tokens,
            ),
            shape,
            devices=devices,
            strategy=strategy(variant_adapter),
            dtype=dtype,
        )
        # What the method adds (pairs, a reference model): tuneforge.estimates.methods.
        return for_method(
            memory, shape, method=request.method, adapter_type=variant_adapter.type, dtype=dtype, rft=rft
        )

    def size(variant: Variant) -> int:
        variant_counts = adapter_counts(config, variant.adapter, param, budget)
        return breakdown(
            variant.adapter,
            variant_counts,
            variant.batch_size,
            variant.seq_len,
            variant.gradient_accumulation_steps,
            variant.gradient_checkpointing,
        ).total

    memory = breakdown(adapter, counts, batch_size, seq_len, accumulation, request.gradient_checkpointing)

    epoch_steps = (
        training_hp.steps_per_epoch(math.ceil(rows / devices), math.ceil(batch_size / devices), accumulation)
        if rows
        else None
    )
    steps = hp.max_steps if hp.max_steps is not None else (n_epochs * epoch_steps if epoch_steps else None)

    throughput = None
    seconds = None
    if hardware_name is not None:
        measured = hw.find_throughput(hardware_name, shape.total_params, adapter.type != "full")
        if measured is not None:  # compute per token grows with the parameter count (6N rule)
            tps = measured.tokens_per_second * measured.total_params / shape.total_params
            throughput = Throughput(
                hardware=hardware_name, tokens_per_second=round(tps, 1), source=measured.how
            )
            if n_tokens and rows:
                trained = float(n_tokens * n_epochs)
                if hp.max_steps is not None and epoch_steps:
                    trained *= hp.max_steps / (n_epochs * epoch_steps)
                seconds = round(trained / (tps * devices), 1)

    usable = hw.usable_bytes(device_bytes, is_gpu) if device_bytes is not None else None
    current = Variant("as asked", adapter, request.gradient_checkpointing, batch_size, accumulation, seq_len)
    recommendation = recommend(
        method=request.method,
        data_format=data_format,
        domain_shift=request.domain_shift,
        n_examples=n_examples,
        current=current,
        size=size,
        usable=usable,
    )
    return EstimateResponse(
        model=request.model,
        architecture=shape.architecture,
        adapter=adapter,
        method=request.method,
        trainable_params=counts.trainable_params,
        total_params=counts.total_params,
        trainable_percent=round(100 * counts.trainable_params / counts.total_params, 4),
        dtype=dtype,
        memory=Memory(
            weights=memory.weights,
            gradients=memory.gradients,
            optimizer=memory.optimizer,
            activations=memory.activations,
            total=memory.total,
        ),
        memory_notes=memory.notes,
        batch_size=batch_size,
        seq_len=seq_len,
        n_epochs=n_epochs,
        tokens_per_epoch=n_tokens,
        steps=steps,
        estimated_seconds=seconds,
        throughput=throughput,
        hardware=hardware_name,
        device_memory_bytes=device_bytes,
        fits=None if usable is None else memory.total <= usable,
        recommendation=recommendation,
    )
