"""It learns: supervised LoRA answers the 32 questions it was taught, DPO prefers what it was told to."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

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


@torch.no_grad()
def _mean_margin(model: Any, tokenizer: Any, pairs: list[dict[str, Any]]) -> float:
    """Mean over pairs of log p(chosen | prompt) - log p(rejected | prompt), summed over answer tokens."""
    model.eval()

    def logp(prompt: list[dict[str, str]], answer: list[dict[str, str]]) -> float:
        head = tokenizer.apply_chat_template(
            prompt, tokenize=True, return_dict=True, add_generation_prompt=True
        )
        whole = tokenizer.apply_chat_template(prompt + answer, tokenize=True, return_dict=True)
        ids = torch.tensor([whole["input_ids"]])
        start = len(head["input_ids"])
        logits = model(input_ids=ids).logits.float().log_softmax(-1)[0, :-1]
        targets = ids[0, 1:]
        token_logps = logits.gather(-1, targets[:, None])[:, 0]
        return float(token_logps[start - 1 :].sum())

    margins = [logp(p["prompt"], p["chosen"]) - logp(p["prompt"], p["rejected"]) for p in pairs]
    return sum(margins) / len(margins)


@pytest.mark.slow
def test_dpo_raises_the_preference_margin(tiny_chat_path: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_path)
    pairs = read_training_file(DATA / "preferences.jsonl", "dpo", tokenizer, 1024).rows
    base_margin = _mean_margin(AutoModelForCausalLM.from_pretrained(tiny_chat_path), tokenizer, pairs)

    spec = make_spec("dpo", max_steps=16, batch_size=8, learning_rate=3e-3, lr_scheduler_type="constant")
    finished = train(spec, tiny_chat_path, DATA / "preferences.jsonl", tmp_path / "run")
    trained_margin = _mean_margin(finished.model, tokenizer, pairs)
    assert trained_margin > base_margin + 1.0, (base_margin, trained_margin)
