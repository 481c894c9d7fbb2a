"""Decoding with prompt-learning adapters (prompt tuning, prefix tuning) as their forward computes.

PEFT 0.21's `PeftModel.generate` puts the virtual tokens in again at every decoding step under
transformers 5 (whose forward takes `cache` where PEFT passes `past_key_values`), so its answers
are not what the adapter's forward over the whole sequence, as in training, makes of the prompt.
`start` adds them once, before the prompt, and the plain base model runs from there with a KV
cache: the inference engine's prefill and the evaluations' greedy answers (`greedy`) both use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def virtual_tokens(model: Any) -> int:
    """The virtual tokens that the model's active adapter puts before the prompt: 0 for a model
    that is not a PeftModel, for other adapters, and inside `disable_adapter()`."""
    from peft import PeftModel

    if not isinstance(model, PeftModel) or model._adapters_disabled:
        return 0
    config = model.active_peft_config
    return int(config.num_virtual_tokens) if config.is_prompt_learning else 0


@dataclass
class Start:
    """What the first forward of a decode takes (`model(**inputs, attention_mask=...,
    position_ids=..., cache=..., use_cache=True)`); `model` runs the later steps too, and the
    attention mask covers the virtual tokens (extend it by one per step)."""

    model: Any
    inputs: dict[str, torch.Tensor]
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    cache: Any

    @property
    def next_position(self) -> torch.Tensor:
        """Each row's position for the first new token."""
        return self.position_ids[:, -1] + 1


def start(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Start:
    """The first step of a decode over left-padded prompts: with a prompt-learning adapter, the
    virtual tokens go before the prompt once (prompt tuning: their embeddings before the prompt's;
    prefix tuning: their keys and values as the starting cache), and the base model runs;
    otherwise the model itself runs the prompt. Positions follow the attention mask."""
    import torch
    from peft import PeftType
    from transformers import DynamicCache

    cache: Any = DynamicCache()
    inputs = {"input_ids": input_ids}
    virtual = virtual_tokens(model)
    prefix = False
    if virtual:
        rows = input_ids.shape[0]
        prefix = model.active_peft_config.peft_type == PeftType.PREFIX_TUNING
        ones = torch.ones((rows, virtual), dtype=attention_mask.dtype, device=attention_mask.device)
        attention_mask = torch.cat([ones, attention_mask], 1)
        if prefix:
            cache = model.get_prompt(batch_size=rows, max_cache_len=-1)
        else:
            embeds = model.word_embeddings(input_ids)
            prompts = model.get_prompt(batch_size=rows).to(embeds.dtype)
            inputs = {"inputs_embeds": torch.cat([prompts, embeds], dim=1)}
        model = model.base_model
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    if prefix:
        positions = positions[:, virtual:]  # the prefix is in the cache already
    return Start(model, inputs, attention_mask, positions, cache)


def greedy(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    eos_token_ids: set[int],
) -> list[list[int]]:
    """Each left-padded prompt's greedy continuation, up to its first end-of-sequence token
    (left out) or `max_new_tokens`, decoded from `start` with a KV cache."""
    import torch

    begin = start(model, input_ids, attention_mask)
    mask, position = begin.attention_mask, begin.next_position
    answers: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    done = [False] * len(answers)
    with torch.no_grad():
        logits = begin.model(
            **begin.inputs,
            attention_mask=mask,
            position_ids=begin.position_ids,
            cache=begin.cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1, :]
        for step in range(max_new_tokens):
            tokens = logits.argmax(dim=-1)
            for i, token in enumerate(tokens.tolist()):
                if not done[i]:
                    done[i] = token in eos_token_ids
                    if not done[i]:
                        answers[i].append(token)
            if all(done) or step + 1 == max_new_tokens:
                break
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            logits = begin.model(
                input_ids=tokens[:, None],
                attention_mask=mask,
                position_ids=position[:, None],
                cache=begin.cache,
                use_cache=True,
            ).logits[:, -1, :]
            position = position + 1
    return answers
