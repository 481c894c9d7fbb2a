"""QLoRA on several CUDA devices, as far as a machine without a GPU can check it: the load
arguments each rank builds (4-bit storage dtype, its own device), the accelerate FSDP plugin
environment `distributed.configure` sets, read back by accelerate's own plugin, and the dtype
invariant FSDP1 needs from a model loaded with those arguments (loaded here on CPU).

No GPU runs here: a CUDA device is described by a `Device(cuda=True, ...)` value (loading.py
builds arguments from it and touches no CUDA API), and `torch.cuda.is_available` is monkeypatched
to True for `configure`, the one place that asks torch; nothing CUDA-side is executed. A real
multi-GPU QLoRA + FSDP run is untested (docs/scaling.md)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tuneforge.models.spec import AdapterSpec, JobSpec
from tuneforge.training import distributed
from tuneforge.training.loading import Device, load_kwargs, qlora_sharded, quantization_config

CUDA = Device(True, "bfloat16", "sdpa")
CPU = Device(False, "float32", "sdpa")
QLORA = AdapterSpec.model_validate({"type": "qlora", "quant_type": "nf4", "double_quant": True})
LORA = AdapterSpec.model_validate({"type": "lora"})
FSDP_VARIABLES = sorted({*distributed.FSDP_ENV, *distributed.QLORA_FSDP_ENV})


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """No FSDP or torchrun variables from elsewhere, and none left behind: `configure` sets them
    in os.environ itself (monkeypatch restores only the variables it saw at first)."""
    names = [*FSDP_VARIABLES, "LOCAL_RANK", "WORLD_SIZE", "RANK"]
    saved = {name: os.environ.pop(name, None) for name in names}
    monkeypatch.setattr(distributed, "_run", {})
    yield monkeypatch
    for name, value in saved.items():
        os.environ.pop(name, None)
        if value is not None:
            os.environ[name] = value


def spec(adapter: dict[str, object], strategy: str = "fsdp") -> JobSpec:
    return JobSpec.model_validate(
        {
            "model": "tuneforge/tiny-chat",
            "training_file": "file-x",
            "adapter": adapter,
            "hardware": {"count": 2, "strategy": strategy},
        }
    )


def test_single_cuda_device_loads_qlora_on_device_0_with_default_storage(
    clean_env: pytest.MonkeyPatch,
) -> None:
    kwargs = load_kwargs(CUDA, QLORA)
    assert kwargs["device_map"] == {"": 0}
    assert kwargs["dtype"] == torch.bfloat16
    quant = kwargs["quantization_config"]
    assert quant.bnb_4bit_quant_storage == torch.uint8
    assert quant.bnb_4bit_compute_dtype == torch.bfloat16
    assert not qlora_sharded(QLORA, CUDA)


def test_ddp_rank_loads_qlora_on_its_own_device(clean_env: pytest.MonkeyPatch) -> None:
    """accelerate trains rank 1 on cuda:1 and refuses a 4-bit model loaded on another device;
    every rank used to load onto device 0."""
    clean_env.setenv("LOCAL_RANK", "1")
    kwargs = load_kwargs(CUDA, QLORA)
    assert kwargs["device_map"] == {"": 1}
    assert kwargs["quantization_config"].bnb_4bit_quant_storage == torch.uint8
    assert not qlora_sharded(QLORA, CUDA)


def test_fsdp_rank_stores_4bit_weights_in_the_model_dtype(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("LOCAL_RANK", "1")
    clean_env.setenv("ACCELERATE_USE_FSDP", "true")
    assert qlora_sharded(QLORA, CUDA)
    kwargs = load_kwargs(CUDA, QLORA)
    quant = kwargs["quantization_config"]
    assert quant.bnb_4bit_quant_storage == torch.bfloat16 == kwargs["dtype"]
    assert quant.bnb_4bit_compute_dtype == torch.bfloat16
    assert quant.bnb_4bit_quant_type == "nf4" and quant.bnb_4bit_use_double_quant
    assert kwargs["device_map"] == {"": 1}


def test_cpu_and_other_adapters_are_unchanged(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("ACCELERATE_USE_FSDP", "true")  # never set on CPU; even so, CPU ignores it
    cpu = load_kwargs(CPU, QLORA)
    assert "device_map" not in cpu and cpu["dtype"] == torch.float32
    assert cpu["quantization_config"].bnb_4bit_quant_storage == torch.uint8
    assert not qlora_sharded(QLORA, CPU)
    lora = load_kwargs(CUDA, LORA)
    assert "quantization_config" not in lora and "device_map" not in lora
    assert quantization_config(LORA, CUDA) is None
    assert "quantization_config" not in load_kwargs(CUDA, None)


def configured(
    clean_env: pytest.MonkeyPatch, job: JobSpec, *, cuda: bool
) -> tuple[dict[str, object], dict[str, str]]:
    clean_env.setenv("WORLD_SIZE", "2")
    if cuda:  # no GPU here: only configure's question to torch is answered as on a CUDA host
        clean_env.setattr(torch.cuda, "is_available", lambda: True)
    run = distributed.configure(job)
    return run, {name: os.environ[name] for name in FSDP_VARIABLES if name in os.environ}


def test_configure_sets_fsdp1_for_qlora_on_cuda(clean_env: pytest.MonkeyPatch) -> None:
    run, env = configured(clean_env, spec({"type": "qlora"}), cuda=True)
    assert run == {"world_size": 2, "strategy": "fsdp", "strategy_asked": "fsdp"}
    assert env["ACCELERATE_USE_FSDP"] == "true"
    assert env["FSDP_VERSION"] == "1"
    assert env["FSDP_USE_ORIG_PARAMS"] == "false"
    assert env["FSDP_SYNC_MODULE_STATES"] == "true"
    assert env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "false"

    # accelerate's own plugin reads that environment as FSDP1, flat parameters, full shard. It
    # refuses sync_module_states on a CPU-only host (its parameter init needs an accelerator),
    # so that one field is passed here instead of read.
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import ShardingStrategy, StateDictType

    plugin = FullyShardedDataParallelPlugin(sync_module_states=False)
    assert plugin.fsdp_version == 1
    assert plugin.use_orig_params is False
    assert plugin.sharding_strategy == ShardingStrategy.FULL_SHARD
    assert plugin.state_dict_type == StateDictType.FULL_STATE_DICT
    assert plugin.cpu_ram_efficient_loading is False
    with pytest.raises(RuntimeError, match="sync_module_states"):
        FullyShardedDataParallelPlugin()  # read from the environment: True


def test_configure_keeps_fsdp2_for_other_adapters_on_cuda(clean_env: pytest.MonkeyPatch) -> None:
    run, env = configured(clean_env, spec({"type": "full"}), cuda=True)
    assert run["strategy"] == "fsdp"
    assert env["FSDP_VERSION"] == "2" and env["FSDP_RESHARD_AFTER_FORWARD"] == "true"
    assert "FSDP_USE_ORIG_PARAMS" not in env and "FSDP_SYNC_MODULE_STATES" not in env

    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True


def test_configure_runs_qlora_fsdp_as_ddp_on_cpu(clean_env: pytest.MonkeyPatch) -> None:
    run, env = configured(clean_env, spec({"type": "qlora"}), cuda=False)
    assert run == {"world_size": 2, "strategy": "ddp", "strategy_asked": "fsdp"}
    assert env == {}
    run, env = configured(clean_env, spec({"type": "qlora"}, strategy="ddp"), cuda=True)
    assert run["strategy"] == "ddp" and env == {}


def test_sharded_qlora_load_has_one_dtype_for_fsdp1(
    clean_env: pytest.MonkeyPatch, tiny_chat_path: Path
) -> None:
    """The arguments a sharded QLoRA rank builds, loaded on CPU (bitsandbytes quantizes on CPU;
    the CUDA device map is left out): every parameter, 4-bit ones included, is bf16, so FSDP1 can
    flatten each block. PEFT's k-bit preparation, skipped on those ranks, would upcast the rest."""
    import bitsandbytes as bnb
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    clean_env.setenv("ACCELERATE_USE_FSDP", "true")
    kwargs = load_kwargs(CUDA, QLORA)
    del kwargs["device_map"]
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_path, **kwargs)
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and all(m.weight.dtype == torch.bfloat16 for m in quantized)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}

    prepared = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    assert {p.dtype for p in prepared.parameters()} == {torch.bfloat16, torch.float32}
