"""It learns: supervised LoRA answers the 32 questions it was taught, DPO prefers what it was told to."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.support.preferences import mean_margin
from tests.training.conftest import DATA, greedy_answers, make_spec, qa_pairs, train
from tuneforge.training.data import read_training_file


@pytest.mark.slow
def test_supervised_lora_learns_the_answers(tiny_chat_path: Path, tmp_path: Path) -> None:
    pairs = qa_pairs()
    prompts = [p for p, _ in pairs]
    expected = [a for _, a in pairs]
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_path)
    base = AutoModelForCausalLM.from_pretrained(tiny_chat_path)
    assert sum(a == e for a, e in zip(greedy_answers(base, tokenizer, prompts), expected, strict=True)) == 0

    # 40 epochs of 4 steps. alpha 64 (scale 4) lifts the adapter's output above the random base's
    # noise; seeds 1, 2, 3, 7 and 8 scored 31-32 of 32 with these settings.
    spec = make_spec(
        adapter={"type": "lora", "dropout": 0.0, "alpha": 64},
        n_epochs=40,
        batch_size=8,
        learning_rate=2e-3,
        lr_scheduler_type="constant",
    )
    finished = train(spec, tiny_chat_path, DATA / "qa.jsonl", tmp_path / "run")
    answers = greedy_answers(finished.model, finished.tokenizer, prompts)
    right = sum(a == e for a, e in zip(answers, expected, strict=True))
    assert right >= 0.9 * len(pairs), list(zip(answers, expected, strict=True))


@pytest.mark.slow
def test_dpo_raises_the_preference_margin(tiny_chat_path: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_path)
    pairs = read_training_file(DATA / "preferences.jsonl", "dpo", tokenizer, 1024).rows
    base_margin = mean_margin(AutoModelForCausalLM.from_pretrained(tiny_chat_path), tokenizer, pairs)

    spec = make_spec("dpo", max_steps=16, batch_size=8, learning_rate=3e-3, lr_scheduler_type="constant")
    finished = train(spec, tiny_chat_path, DATA / "preferences.jsonl", tmp_path / "run")
    trained_margin = mean_margin(finished.model, tokenizer, pairs)
    assert trained_margin > base_margin + 1.0, (base_margin, trained_margin)
