"""Loads a downloaded adapter with PEFT onto tiny-chat and asks it the QA set (greedy)."""

from __future__ import annotations

import json
from pathlib import Path


def qa_accuracy(base_dir: Path, adapter_dir: Path | None, qa_path: Path) -> float:
    """Share of the questions whose greedy answer equals the reference exactly."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    rows = [json.loads(line)["messages"] for line in qa_path.read_text().splitlines()]
    prompts = [m[:-1] for m in rows]
    expected = [m[-1]["content"] for m in rows]
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=16, do_sample=False)
    answers = [
        tokenizer.decode(row, skip_special_tokens=True).strip()
        for row in out[:, batch["input_ids"].shape[1] :]
    ]
    return sum(a == e for a, e in zip(answers, expected, strict=True)) / len(expected)
