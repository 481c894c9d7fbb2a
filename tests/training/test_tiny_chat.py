from __future__ import annotations

import hashlib
from pathlib import Path

from tuneforge.training.tiny_chat import build_tiny_chat


def _digest(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()
    }


def test_build_is_deterministic_and_cached(tiny_chat_path: Path, tmp_path: Path) -> None:
    again = build_tiny_chat(tmp_path)
    assert _digest(again) == _digest(tiny_chat_path)
    assert build_tiny_chat(tmp_path) == again  # cached: same directory, no rebuild


def test_chat_template_masks_assistant_tokens(tiny_chat_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_path)
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Skip me", "weight": 0},
        {"role": "user", "content": "Again"},
        {"role": "assistant", "content": "Learn me"},
    ]
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    trained = [t for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(trained) == "Learn me<|im_end|>"
