"""The memory model against a real run: tiny-chat trained on CPU for a few steps in a fresh
process, peak RSS growth against the estimate (within 25%)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuneforge.estimates.calibrate import calibrate


@pytest.mark.slow
@pytest.mark.parametrize("adapter", ["full", "lora", "qlora"])
def test_memory_estimate_within_25_percent_of_measured_peak(tiny_chat_path: Path, adapter: str) -> None:
    result = calibrate(tiny_chat_path, adapter, batch_size=8, seq_len=512)
    assert result.measured_bytes > 100 * 2**20  # a real run, big enough to measure
    assert abs(result.error) < 0.25, result


@pytest.mark.slow
def test_memory_estimate_with_gradient_checkpointing(tiny_chat_path: Path) -> None:
    result = calibrate(tiny_chat_path, "lora", batch_size=8, seq_len=512, checkpointing=True)
    assert abs(result.error) < 0.25, result


@pytest.mark.slow
def test_memory_estimate_against_the_training_recipe(tiny_chat_path: Path) -> None:
    """The same check through run_training (TRL SFTTrainer), which adds host-side overhead."""
    result = calibrate(tiny_chat_path, "lora", batch_size=8, seq_len=512, recipe=True)
    assert abs(result.error) < 0.25, result
