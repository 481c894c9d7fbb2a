"""Evaluations inside a job: greedy answers to the validation file's items, written as JSONL for
the worker to grade (grading may call a model endpoint or a sandboxed process, which a training
run does not do).

`EvaluationCallback` (tuneforge/training/callbacks.py) answers the items with the model being
trained at every checkpoint (before the checkpoint is reported, so its answers are on disk when
the worker stores it) and at the end, and, with `compare_base`, once with the starting model (the
base, or the source model a job continues from) before the first step. The files live under
`<out_dir>/evaluation/` (`answers_path`); the base answers also go into every checkpoint, so a
resumed run keeps them.

Importing this module imports neither torch nor transformers: the worker reads the answers
with `answers_path` and `read_answers`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EVALUATION_DIR = "evaluation"
BASE_ANSWERS = "base.jsonl"
#: The base answers' name inside a checkpoint directory (stored with its trainer state).
CHECKPOINT_BASE_ANSWERS = "tuneforge-evaluation-base.jsonl"
GENERATION_BATCH = 8


def answers_path(out_dir: Path, step: int | None) -> Path:
    """Where the answers at `step` (None: the starting model's) are written."""
    return out_dir / EVALUATION_DIR / (BASE_ANSWERS if step is None else f"step-{step}.jsonl")


def read_answers(path: Path) -> list[dict[str, Any]]:
    """Rows of `{"index", "prompt", "reference", "item", "answer"}`."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass(frozen=True)
class EvalItem:
    prompt: list[dict[str, str]] | str  # chat messages, or raw text for prompt/completion data
    reference: str | None
    item: dict[str, Any]  # what the grader reads as `item`


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) if isinstance(part, dict) else str(part) for part in content)
    return "" if content is None else str(content)


def _chat(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [{"role": str(m["role"]), "content": _text(m.get("content"))} for m in messages]


def _item(record: dict[str, Any], consumed: tuple[str, ...], reference: str | None) -> dict[str, Any]:
    item = {key: value for key, value in record.items() if key not in consumed}
    item["reference"] = reference
    return item


def eval_item(record: dict[str, Any]) -> EvalItem | None:
    """The prompt, reference and grader item of one validation line; None for a line with no
    prompt to answer."""
    if isinstance(record.get("messages"), list) and record["messages"]:
        messages = record["messages"]
        reference = None
        if messages[-1].get("role") == "assistant":
            reference, messages = _text(messages[-1].get("content")), messages[:-1]
        return (
            EvalItem(_chat(messages), reference, _item(record, ("messages",), reference))
            if messages
            else None
        )
    if isinstance(record.get("conversations"), list):  # ShareGPT
        roles = {
            "human": "user",
            "user": "user",
            "gpt": "assistant",
            "assistant": "assistant",
            "system": "system",
        }
        turns = [
            {"role": roles.get(t.get("from"), "user"), "content": t.get("value")}
            for t in record["conversations"]
        ]
        return eval_item({**{k: v for k, v in record.items() if k != "conversations"}, "messages": turns})
    if "instruction" in record and "output" in record:  # Alpaca, trained as a user/assistant pair
        extra = record.get("input") or ""
        user = str(record["instruction"]) + (f"\n\n{extra}" if extra else "")
        reference = str(record["output"])
        return EvalItem([{"role": "user", "content": user}], reference, _item(record, (), reference))
    if isinstance(record.get("input"), dict) and isinstance(record.get("preferred_output"), list):
        reference = (
            _text(record["preferred_output"][-1].get("content")) if record["preferred_output"] else None
        )
        return EvalItem(_chat(record["input"].get("messages") or []), reference, _item(record, (), reference))
    if "prompt" in record and ("completion" in record or "chosen" in record):
        answer = record.get("completion", record.get("chosen"))
        prompt = record["prompt"]
        reference = answer if isinstance(answer, str) else _text((answer or [{}])[-1].get("content"))
        if isinstance(prompt, list):
            return EvalItem(_chat(prompt), reference, _item(record, (), reference))
        if "chosen" in record and not isinstance(answer, str):
            return EvalItem(
                [{"role": "user", "content": str(prompt)}], reference, _item(record, (), reference)
            )
        return EvalItem(str(prompt), reference, _item(record, (), reference))
    return None


def read_items(path: Path, limit: int) -> list[EvalItem]:
    """The first `limit` answerable lines of a validation file."""
    items: list[EvalItem] = []
    with path.open() as handle:
        for line in handle:
            if len(items) >= limit:
                break
            if line.strip():
                record = json.loads(line)
                item = eval_item(record) if isinstance(record, dict) else None
                if item is not None:
                    items.append(item)
    return items


def generate_answers(model: Any, tokenizer: Any, items: list[EvalItem], max_new_tokens: int) -> list[str]:
    """Greedy answers, in batches, with the tokenizer's chat template for chat prompts. A
    prompt-learning adapter's answers come from `generation.greedy` (PEFT's `generate` repeats
    their virtual tokens at every step), the others' from `model.generate`."""
    import torch

    from tuneforge.training import generation

    prompt_learning = generation.virtual_tokens(model) > 0
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    eos = tokenizer.eos_token_id if eos is None else eos
    eos_token_ids = set(eos) if isinstance(eos, list) else {eos}

    was_training = model.training
    padding_side, pad_token = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    answers: list[str] = []
    try:
        for start in range(0, len(items), GENERATION_BATCH):
            batch = items[start : start + GENERATION_BATCH]
            chat = all(isinstance(item.prompt, list) for item in batch)
            texts = [
                tokenizer.apply_chat_template(item.prompt, tokenize=False, add_generation_prompt=True)
                if isinstance(item.prompt, list)
                else item.prompt
                for item in batch
            ]
            inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not chat)
            inputs = {key: value.to(model.device) for key, value in inputs.items()}
            new_tokens: Any
            if prompt_learning:
                new_tokens = generation.greedy(
                    model, inputs["input_ids"], inputs["attention_mask"], max_new_tokens, eos_token_ids
                )
            else:
                with torch.no_grad():
                    output = model.generate(
                        **inputs,
                        max_new_tokens=max_new_tokens,
                        do_sample=False,
                        use_cache=True,
                        pad_token_id=tokenizer.pad_token_id,
                    )
                new_tokens = output[:, inputs["input_ids"].shape[1] :]
            answers += [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new_tokens]
    finally:
        tokenizer.padding_side = padding_side
        tokenizer.pad_token = pad_token
        if was_training:
            model.train()
    return answers


def write_answers(path: Path, items: list[EvalItem], answers: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as handle:
        for index, (item, answer) in enumerate(zip(items, answers, strict=True)):
            row = {"index": index, "prompt": item.prompt, "reference": item.reference, "item": item.item}
            handle.write(json.dumps({**row, "answer": answer}, ensure_ascii=False) + "\n")
    tmp.replace(path)
