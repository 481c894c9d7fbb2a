"""The ground truth for greedy answers: the model's forward over the whole sequence at each step.

No KV cache and no `generate`: for a PEFT adapter this is PeftModel's forward, as in training,
so a prompt-learning adapter's virtual tokens sit before the prompt exactly once. (PEFT 0.21's
`generate` misplaces them with transformers 5, whose forward takes `cache` where PEFT passes
`past_key_values`.) Slow, one prompt at a time: for checking decoders against, in tests.
"""

from __future__ import annotations

from typing import Any


def full_sequence_greedy(
    model: Any, tokenizer: Any, prompt: list[dict[str, str]] | str, max_new_tokens: int
) -> str:
    """The greedy continuation of a chat prompt (with the tokenizer's chat template) or a text
    prompt, up to the end-of-sequence token or `max_new_tokens`, decoded without special tokens."""
    import torch

    chat = isinstance(prompt, list)
    text = (
        tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) if chat else prompt
    )
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=not chat)["input_ids"].to(model.device)
    prompt_length = ids.shape[1]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for _ in range(max_new_tokens):
                token = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].argmax()
                if int(token) == tokenizer.eos_token_id:
                    break
                ids = torch.cat([ids, token.view(1, 1)], dim=1)
    finally:
        if was_training:
            model.train()
    return str(tokenizer.decode(ids[0, prompt_length:], skip_special_tokens=True))
