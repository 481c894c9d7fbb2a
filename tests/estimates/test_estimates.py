"""The calculator against PEFT itself (built independently on the meta device), pinned figures
for Llama-3.1-8B, bad input, and the advisor's rules."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.support.model_configs import LLAMA_31_8B
from tuneforge.estimates import EstimateError, EstimateRequest, FileStats, estimate
from tuneforge.training.hyperparams import auto_batch_size, auto_epochs

QWEN2_SMALL: dict[str, Any] = {
    "model_type": "qwen2",
    "vocab_size": 4096,
    "hidden_size": 256,
    "intermediate_size": 704,
    "num_hidden_layers": 3,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "tie_word_embeddings": True,
}
PHI3_SMALL: dict[str, Any] = {
    "model_type": "phi3",
    "vocab_size": 2048,
    "hidden_size": 192,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 6,
    "num_key_value_heads": 6,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def _request(config: dict[str, Any], **body: Any) -> EstimateRequest:
    return EstimateRequest.model_validate({"model_config": config, **body})


def _peft_counts(config: dict[str, Any], peft_config: Any) -> tuple[int, int]:
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
    hf_config = AutoConfig.for_model(config["model_type"], **kwargs)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    if peft_config is None:
        n = sum(p.numel() for p in model.parameters())
        return n, n
    trainable, total = get_peft_model(model, peft_config).get_nb_trainable_parameters()
    return int(trainable), int(total)


def test_llama_31_8b_lora_q_v_pins() -> None:
    result = estimate(
        _request(LLAMA_31_8B, adapter={"type": "lora", "r": 16, "target_modules": ["q_proj", "v_proj"]})
    )
    assert result.trainable_params == 6_815_744
    assert result.total_params == 8_037_076_992
    assert result.trainable_percent == pytest.approx(100 * 6_815_744 / 8_037_076_992, abs=1e-4)


def test_llama_31_8b_lora_all_linear_pin() -> None:
    result = estimate(_request(LLAMA_31_8B, adapter={"type": "lora", "r": 8, "target_modules": "all-linear"}))
    assert result.trainable_params == 20_971_520


def test_llama_31_8b_full_is_the_base_model() -> None:
    result = estimate(_request(LLAMA_31_8B, adapter={"type": "full"}))
    assert result.trainable_params == result.total_params == 8_030_261_248


@pytest.mark.parametrize("config", [QWEN2_SMALL, PHI3_SMALL], ids=["qwen2", "phi3"])
@pytest.mark.parametrize(
    "adapter",
    [
        {"type": "lora", "r": 8, "target_modules": "all-linear"},
        {"type": "dora", "r": 4, "target_modules": "all-linear"},
        {"type": "qlora", "r": 16, "target_modules": "all-linear"},
        {"type": "prefix_tuning", "num_virtual_tokens": 10},
        {"type": "prompt_tuning", "num_virtual_tokens": 12},
        {"type": "ia3"},
        {"type": "full"},
    ],
    ids=lambda a: a["type"],
)
def test_counts_equal_peft_on_other_architectures(config: dict[str, Any], adapter: dict[str, Any]) -> None:
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig

    kind = adapter["type"]
    peft_config: Any
    if kind in ("lora", "qlora", "dora"):
        peft_config = LoraConfig(
            r=adapter["r"], target_modules="all-linear", use_dora=kind == "dora", task_type="CAUSAL_LM"
        )
    elif kind == "prefix_tuning":
        peft_config = PrefixTuningConfig(num_virtual_tokens=10, task_type="CAUSAL_LM")
    elif kind == "prompt_tuning":
        peft_config = PromptTuningConfig(num_virtual_tokens=12, task_type="CAUSAL_LM")
    elif kind == "ia3":
        # The recipe's IA3 rule: keys, values and the down projection (feed-forward) among the
        # model's module names: all three on Qwen2, only down_proj on Phi-3 (fused qkv_proj).
        targets = ["k_proj", "v_proj", "down_proj"] if config["model_type"] == "qwen2" else ["down_proj"]
        peft_config = IA3Config(
            target_modules=targets, feedforward_modules=["down_proj"], task_type="CAUSAL_LM"
        )
    else:
        peft_config = None
    result = estimate(_request(config, adapter=adapter))
    assert (result.trainable_params, result.total_params) == _peft_counts(config, peft_config)
    assert result.trainable_params > 0


def test_tied_embeddings_count_once_while_another_thread_loads_a_model() -> None:
    """transformers' from_pretrained makes `tie_weights` a no-op on the class while it loads; a
    build in another thread at that moment (CI: the engine test's loads beside this worker's
    estimates) counted a tied output head twice."""
    from transformers.initialization import no_tie_weights

    from tuneforge.estimates import skeleton

    config = QWEN2_SMALL | {"num_hidden_layers": 2}  # a key no other test builds
    with no_tie_weights():
        skeleton.clear_cache()
        counted = estimate(_request(config, adapter={"type": "full"})).total_params
    skeleton.clear_cache()
    assert counted == estimate(_request(config, adapter={"type": "full"})).total_params
    assert counted == _peft_counts(config, None)[1]


def test_lora_count_matches_closed_form() -> None:
    """r * (in + out) per adapted linear: an independent check of the PEFT path on qwen2."""
    result = estimate(_request(QWEN2_SMALL, adapter={"r": 8, "target_modules": ["q_proj", "down_proj"]}))
    h, i, layers, r = 256, 704, 3, 8
    assert result.trainable_params == layers * r * ((h + h) + (i + h))


def test_model_id_resolves_to_local_config(tiny_chat_path: Path) -> None:
    from tuneforge.config import get_settings

    get_settings.cache_clear()
    config = json.loads((tiny_chat_path / "config.json").read_text())
    by_id = estimate(EstimateRequest(model="tuneforge/tiny-chat"))
    by_config = estimate(_request(config))
    assert by_id.model == "tuneforge/tiny-chat"
    assert (by_id.trainable_params, by_id.total_params) == (
        by_config.trainable_params,
        by_config.total_params,
    )
    assert by_id.total_params > by_id.trainable_params > 0


def _error(body: dict[str, Any]) -> EstimateError:
    with pytest.raises(EstimateError) as caught:
        estimate(EstimateRequest.model_validate(body))
    return caught.value


def test_unknown_architecture_names_model_type() -> None:
    err = _error({"model_config": {**LLAMA_31_8B, "model_type": "no-such-arch"}})
    assert err.param == "model_config.model_type"
    assert "no-such-arch" in err.message


def test_missing_model_type() -> None:
    config = {k: v for k, v in LLAMA_31_8B.items() if k != "model_type"}
    assert _error({"model_config": config}).param == "model_config.model_type"


@pytest.mark.parametrize("field", ["hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size"])
def test_missing_field_is_named(field: str) -> None:
    config = {k: v for k, v in LLAMA_31_8B.items() if k != field}
    err = _error({"model_config": config})
    assert err.param == f"model_config.{field}"
    assert field in err.message


def test_missing_field_uses_the_architectures_own_name() -> None:
    gpt2 = {"model_type": "gpt2", "vocab_size": 1000, "n_layer": 2, "n_head": 4}
    assert _error({"model_config": gpt2}).param == "model_config.n_embd"


def test_unmatched_target_modules_list_linear_names() -> None:
    err = _error({"model_config": LLAMA_31_8B, "adapter": {"target_modules": ["q_proj", "qkv"]}})
    assert err.param == "adapter.target_modules"
    for name in ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]:
        assert name in err.message
    assert "qkv" in err.message


def test_rank_must_be_positive() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as caught:
        EstimateRequest.model_validate({"model_config": LLAMA_31_8B, "adapter": {"r": 0}})
    assert caught.value.errors()[0]["loc"] == ("adapter", "r")


def test_unknown_model_id() -> None:
    assert _error({"model": "meta-llama/not-here"}).param == "model"


def test_exactly_one_of_model_and_config() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        EstimateRequest.model_validate({})
    with pytest.raises(ValidationError):
        EstimateRequest.model_validate({"model": "tuneforge/tiny-chat", "model_config": LLAMA_31_8B})


def test_memory_parts_full_bf16() -> None:
    result = estimate(_request(LLAMA_31_8B, adapter={"type": "full"}, dtype="bf16"))
    p = 8_030_261_248
    assert result.memory.weights == 2 * p
    assert result.memory.gradients == 2 * p
    assert result.memory.optimizer == 4 * p
    parts = result.memory
    assert parts.total == parts.weights + parts.gradients + parts.optimizer + parts.activations


def test_memory_ordering_and_levers() -> None:
    def total(**body: Any) -> int:
        base = {"hyperparameters": {"batch_size": 4, "max_seq_length": 2048}, "dtype": "bf16"}
        return estimate(_request(LLAMA_31_8B, **{**base, **body})).memory.total

    full = total(adapter={"type": "full"})
    lora = total(adapter={"type": "lora"})
    qlora = total(adapter={"type": "qlora"})
    assert full > lora > qlora
    assert total(adapter={"type": "lora"}, gradient_checkpointing=True) < lora
    fp4 = estimate(
        _request(LLAMA_31_8B, adapter={"type": "qlora", "quant_type": "fp4", "double_quant": False})
    )
    nf4 = estimate(_request(LLAMA_31_8B, adapter={"type": "qlora", "double_quant": True}))
    assert fp4.memory.weights > nf4.memory.weights  # double quantization saves ~0.37 bit/param
    # 4-bit linear weights: about 0.5 byte per parameter, the rest of the model in bf16
    assert 5.0e9 < nf4.memory.weights < 6.0e9


def test_tokens_steps_and_no_invented_time() -> None:
    result = estimate(
        _request(
            LLAMA_31_8B,
            n_tokens=2_000_000,
            n_examples=4_000,
            hyperparameters={"batch_size": 8, "n_epochs": 2, "gradient_accumulation_steps": 2},
            hardware={"gpu": "a100-80gb"},
        )
    )
    assert result.tokens_per_epoch == 2_000_000
    assert result.steps == 2 * 4_000 // 16
    assert result.estimated_seconds is None  # nothing measured on an A100 for an 8B model
    assert result.throughput is None


def test_file_stats_fill_tokens_and_examples() -> None:
    result = estimate(
        _request(QWEN2_SMALL), file_stats=FileStats(examples=64, approx_tokens=6400, format="chat")
    )
    assert result.tokens_per_epoch == 6400
    # "auto" resolved by the training recipe's rules: batch 4 and 3 epochs for 64 examples
    assert (result.batch_size, result.n_epochs) == (auto_batch_size(64), auto_epochs(64)) == (4, 3)
    assert result.steps == 3 * 16


def test_advisor_few_examples_prompt_tuning() -> None:
    rec = estimate(_request(LLAMA_31_8B, n_examples=300)).recommendation
    assert rec.adapter == "prompt_tuning"
    assert any("300" in reason for reason in rec.reasons)


def test_advisor_mid_size_on_small_gpu_recommends_qlora_with_advice() -> None:
    result = estimate(
        _request(
            LLAMA_31_8B,
            n_examples=20_000,
            hyperparameters={"batch_size": 1, "max_seq_length": 1024},
            hardware={"gpu_memory_gb": 24},
        )
    )
    assert result.fits is False
    assert result.recommendation.adapter == "qlora"
    advice = result.recommendation.fit_advice
    assert advice[0].startswith("turn on gradient checkpointing")
    assert any(line.startswith("use qlora instead of lora") for line in advice)
    assert any("QLoRA" in reason for reason in result.recommendation.reasons)


def test_advisor_many_examples_with_hardware_full() -> None:
    rec = estimate(
        _request(
            LLAMA_31_8B,
            n_examples=500_000,
            hyperparameters={"batch_size": 1, "max_seq_length": 1024},
            gradient_checkpointing=True,
            hardware={"gpu": "h200"},
        )
    ).recommendation
    assert rec.adapter == "full"


def test_advisor_stages_for_preference_and_new_domain() -> None:
    rec = estimate(_request(QWEN2_SMALL, method="dpo", n_examples=5_000)).recommendation
    assert rec.stages == ["supervised", "dpo"]
    rec = estimate(_request(QWEN2_SMALL, data_format="preference_openai")).recommendation
    assert rec.stages == ["supervised", "dpo"]
    rec = estimate(_request(QWEN2_SMALL, domain_shift=True, n_examples=5_000)).recommendation
    assert rec.stages == ["pretraining", "supervised"]
    assert rec.method == "pretraining"


def test_fits_on_big_gpu() -> None:
    result = estimate(
        _request(
            LLAMA_31_8B, adapter={"type": "qlora"}, hyperparameters={"batch_size": 1}, hardware={"gpu": "l4"}
        )
    )
    assert result.fits is True
    assert result.recommendation.fit_advice == []


def test_warm_8b_estimate_is_fast() -> None:
    request = _request(LLAMA_31_8B, adapter={"r": 16, "target_modules": ["q_proj", "v_proj"]})
    estimate(request)
    start = time.perf_counter()
    estimate(request)
    assert time.perf_counter() - start < 0.5


def test_absurd_sizes_are_refused_before_building() -> None:
    err = _error({"model_config": {**LLAMA_31_8B, "num_hidden_layers": 10**6}})
    assert err.param == "model_config.num_hidden_layers"


def test_remote_code_pointer_is_ignored() -> None:
    config = {**QWEN2_SMALL, "auto_map": {"AutoModelForCausalLM": "evil.Model"}}
    assert estimate(_request(config)).total_params == estimate(_request(QWEN2_SMALL)).total_params
