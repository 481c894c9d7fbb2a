"""Loads a downloaded adapter with PEFT onto tiny-chat and asks it the QA set."""

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
    right = total = 0
    for line in qa_path.read_text().splitlines():
        messages = json.loads(line)["messages"]
        prompt, answer = messages[:-1], messages[-1]["content"]
        ids = tokenizer.apply_chat_template(
            prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            out = model.generate(
                **ids,
                max_new_tokens=16,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            )
        text = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        right += text == answer
        total += 1
    return right / total
