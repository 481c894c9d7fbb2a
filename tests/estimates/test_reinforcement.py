"""The estimate of a reinforcement (GRPO) run counts what the job asks for: its num_generations
(auto: the recipe's 4 x compute_multiplier), answers of max_new_tokens, generation's KV cache, and a
KL reference model only when beta is not 0."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from tests.support.model_configs import LLAMA_31_8B
from tuneforge.config import Settings
from tuneforge.estimates import EstimateRequest, EstimateResponse, FileStats, estimate
from tuneforge.estimates.jobs import job_estimate
from tuneforge.models.spec import JobSpec

PARAMS = 8_030_261_248  # Llama-3.1-8B
VOCAB, HIDDEN, LAYERS, KV_WIDTH = 128_256, 4096, 32, 8 * 128
BF16 = 2
PROMPT = 512
CHECK = {
    "type": "string_check",
    "name": "c",
    "input": "{{sample.output_text}}",
    "reference": "4",
    "operation": "eq",
}


def _estimate(method: str, adapter: str = "lora", **hyperparameters: Any) -> EstimateResponse:
    section: dict[str, Any] = {
        "hyperparameters": {"batch_size": 1, "max_seq_length": PROMPT, **hyperparameters}
    }
    if method == "reinforcement":
        section["grader"] = CHECK
    return estimate(
        EstimateRequest.model_validate(
            {
                "model_config": LLAMA_31_8B,
                "adapter": {"type": adapter},
                "method": {"type": method, method: section},
                "dtype": "bf16",
            }
        )
    )


def _activations(**hyperparameters: Any) -> int:
    return _estimate("reinforcement", **hyperparameters).memory.activations


def test_activations_follow_num_generations_and_compute_multiplier() -> None:
    four = _activations()
    assert _activations(num_generations=4) == four  # auto is the recipe's 4
    assert _activations(num_generations=16) == 4 * four
    assert _activations(compute_multiplier=2) == _activations(num_generations=8) == 2 * four
    assert _activations(compute_multiplier=0.25) == _activations(num_generations=2)  # at least 2


def test_answers_are_max_new_tokens_long_and_only_their_logits_are_kept() -> None:
    """A sequence is the prompt (max_seq_length) plus the answer; TRL computes the logits of the
    answer's tokens and one more (logits_to_keep + 1), so the output head's share is that of 65
    positions, where a supervised batch of the same 4 x 576-token sequences keeps all 576."""
    for new_tokens in (64, 256):
        tokens = PROMPT + new_tokens
        supervised = _estimate("supervised", batch_size=4, max_seq_length=tokens).memory.activations
        rft = _activations(max_new_tokens=new_tokens)
        head = 4 * VOCAB + HIDDEN  # logits, log-softmax and their two gradients, plus the final norm
        assert supervised - rft == 4 * BF16 * head * (tokens - (new_tokens + 1))
    assert _activations(max_new_tokens=1024) > _activations(max_new_tokens=256) > _activations()


def test_generation_kv_cache_counts_when_it_outweighs_training() -> None:
    """TRL generates the answers of every accumulated micro-batch at once; their KV cache is freed
    before the backward pass, so the estimate counts the larger of the two."""
    few = _estimate("reinforcement", gradient_accumulation_steps=2)
    assert few.memory.activations == _activations()
    assert any("freed before the backward pass" in note for note in few.memory_notes)
    many = _estimate("reinforcement", gradient_accumulation_steps=64)
    cache = 2 * LAYERS * KV_WIDTH * BF16 * (PROMPT + 64) * 4 * 64
    assert many.memory.activations == cache > few.memory.activations
    assert any("outweighs the training activations" in note for note in many.memory_notes)


def test_a_reference_model_only_with_a_kl_term() -> None:
    supervised = _estimate("supervised", adapter="full").memory.weights
    assert _estimate("reinforcement", adapter="full").memory.weights == supervised + PARAMS * BF16
    assert _estimate("reinforcement", adapter="full", beta=0.1).memory.weights == supervised + PARAMS * BF16
    no_kl = _estimate("reinforcement", adapter="full", beta=0)
    assert no_kl.memory.weights == supervised
    assert "reinforcement: beta 0, no KL reference model" in no_kl.memory_notes
    lora = _estimate("supervised").memory.weights
    assert (
        _estimate("reinforcement").memory.weights == _estimate("reinforcement", beta=0).memory.weights == lora
    )


def test_sampling_knobs_belong_to_reinforcement() -> None:
    with pytest.raises(ValidationError) as refused:
        _estimate("supervised", num_generations=8)
    assert refused.value.errors()[0]["loc"] == ("hyperparameters", "num_generations")


def test_a_reinforcement_jobs_stored_estimate_uses_its_settings(
    models_dir: Path, tiny_chat_path: Path, tmp_path: Path
) -> None:
    """What POST /v1/fine_tuning/jobs stores (tuneforge.estimates.jobs.job_estimate) reads the
    job's sampling settings, where it once counted 4 answers and a reference whatever they were."""
    settings = Settings(data_dir=tmp_path, models_dir_override=models_dir)

    def stored(adapter: str, **hyperparameters: Any) -> dict[str, Any]:
        spec = JobSpec.model_validate(
            {
                "model": "tuneforge/tiny-chat",
                "training_file": "file-x",
                "adapter": {"type": adapter},
                "method": {
                    "type": "reinforcement",
                    "reinforcement": {
                        "grader": CHECK,
                        "hyperparameters": {"batch_size": 2, **hyperparameters},
                    },
                },
            }
        )
        body = job_estimate(spec, FileStats(examples=8), settings)
        assert body is not None
        return body["memory"]

    assert (
        stored("lora", num_generations=8)["activations"]
        == 4 * stored("lora", num_generations=2)["activations"]
    )
    with_kl, without = stored("full", num_generations=2), stored("full", num_generations=2, beta=0)
    assert with_kl["weights"] > without["weights"]
