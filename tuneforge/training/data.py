"""Readers: every JSONL format of CONTRACT.md into the dataset types TRL trains on.

- chat, Alpaca, ShareGPT -> conversational `{"messages"}` (assistant `weight` kept: a chat template
  with `{% generation %}` markers that leaves weight-0 turns outside them, as tiny-chat's does, keeps
  them out of TRL's `assistant_only_loss`; for a template that ignores `weight` the count of such
  turns is reported as `weight_zero_not_honoured`).
- prompt/completion -> prompt-completion (`completion_only_loss`).
- OpenAI preference and `{"prompt", "chosen", "rejected"}` -> preference.
- text -> `{"text"}` (language modelling, packed by the pretraining recipe).

Awkward data is counted, never fatal: examples longer than `max_seq_length` (truncated by TRL),
empty assistant turns, chat examples without a single trained assistant turn (dropped: they have
nothing to learn from), DPO pairs whose chosen equals rejected. The counts go into `warnings`.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneforge.training.formats import (
    KTO_FORMATS,
    LABEL_MISSING,
    METHOD_FORMATS,
    SHAREGPT_ROLES,
    DataFormat,
    FormatError,
    check_record,
    detect_format,
    mixed_formats,
    parse_line,
)

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

Message = dict[str, Any]


class DataError(ValueError):
    """A training or validation file that cannot be trained on; the message names file and line."""


@dataclass
class DataStats:
    format: str
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0  # tokens in the loss (assistant turns, completions, chosen); before truncation
    min_tokens: int = 0
    max_tokens: int = 0

    @property
    def mean_tokens(self) -> float:
        return self.tokens / self.examples if self.examples else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "examples": self.examples,
            "tokens": self.tokens,
            "trained_tokens": self.trained_tokens,
            "min_tokens": self.min_tokens,
            "mean_tokens": round(self.mean_tokens, 1),
            "max_tokens": self.max_tokens,
        }


@dataclass
class TrainingData:
    """One file, converted. `kind` is TRL's dataset type."""

    kind: str  # "conversational", "prompt_completion", "preference" or "text"
    rows: list[dict[str, Any]]
    stats: DataStats
    warnings: Counter[str] = field(default_factory=Counter)
    cache_key: Any = None  # its tokenization cache key (tuneforge.training.tokcache.DataKey), if cached

    def dataset(self) -> Dataset:
        from datasets import Dataset

        return Dataset.from_list(self.rows)


def read_records(path: Path, method: str) -> tuple[DataFormat, list[dict[str, Any]]]:
    """Parses and checks a JSONL file; raises DataError naming the file and the first bad line."""
    records: list[dict[str, Any]] = []
    fmt: DataFormat | None = None
    try:
        with path.open("rb") as handle:
            for number, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                record = parse_line(raw, number)
                try:
                    line_format = detect_format(record, method)
                    if method == "kto" and line_format in KTO_FORMATS.values():
                        raise ValueError(LABEL_MISSING)
                    if fmt is not None and line_format is not fmt:
                        raise ValueError(mixed_formats(line_format, fmt))
                    check_record(record, line_format)
                except ValueError as exc:
                    raise FormatError(number, str(exc)) from None
                fmt = line_format
                records.append(record)
    except FormatError as exc:
        raise DataError(f"{path.name}: {exc}") from None
    if fmt is None:
        raise DataError(f"{path.name}: the file holds no examples")
    if fmt not in METHOD_FORMATS[method]:
        allowed = ", ".join(sorted(f.value for f in METHOD_FORMATS[method]))
        raise DataError(f"{path.name}: {fmt.value} data cannot train method {method!r} (expected {allowed})")
    return fmt, records


def _content(message: dict[str, Any]) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content)
    return str(content)


def _messages(raw: list[dict[str, Any]]) -> list[Message]:
    """OpenAI messages reduced to role, content and weight (every turn carries `weight`, so the
    Arrow schema is uniform; only assistant weights mean anything)."""
    out = []
    for message in raw:
        weight = message.get("weight", 1) if message["role"] == "assistant" else 1
        out.append({"role": message["role"], "content": _content(message), "weight": int(weight)})
    return out


def _convert_supervised(fmt: DataFormat, record: dict[str, Any]) -> dict[str, Any]:
    if fmt is DataFormat.CHAT:
        row: dict[str, Any] = {"messages": _messages(record["messages"])}
        if record.get("tools") is not None:
            row["tools"] = json.dumps(record["tools"])
        return row
    if fmt is DataFormat.ALPACA:
        extra = record.get("input") or ""
        user = record["instruction"] + (f"\n\n{extra}" if extra else "")
        return {
            "messages": [
                {"role": "user", "content": user, "weight": 1},
                {"role": "assistant", "content": record["output"], "weight": 1},
            ]
        }
    if fmt is DataFormat.SHAREGPT:
        return {
            "messages": [
                {"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"], "weight": 1}
                for turn in record["conversations"]
            ]
        }
    if fmt is DataFormat.PROMPT_COMPLETION:
        return {"prompt": record["prompt"], "completion": record["completion"]}
    raise AssertionError(fmt)


def _as_messages(value: str | list[dict[str, Any]], role: str) -> list[Message]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return [{"role": m["role"], "content": _content(m)} for m in value]


def _convert_preference(fmt: DataFormat, record: dict[str, Any]) -> dict[str, Any]:
    if fmt is DataFormat.PREFERENCE_OPENAI:
        return {
            "prompt": _as_messages(record["input"]["messages"], "user"),
            "chosen": _as_messages(record["preferred_output"], "assistant"),
            "rejected": _as_messages(record["non_preferred_output"], "assistant"),
        }
    prompt, chosen, rejected = record.get("prompt", ""), record["chosen"], record["rejected"]
    if all(isinstance(v, str) for v in (prompt, chosen, rejected)):
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    # Mixed strings and message lists: make all of them conversational.
    return {
        "prompt": _as_messages(prompt, "user"),
        "chosen": _as_messages(chosen, "assistant"),
        "rejected": _as_messages(rejected, "assistant"),
    }


_GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


def has_generation_markers(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the chat template marks assistant content with `{% generation %}`."""
    return bool(_GENERATION_MARKER.search(str(tokenizer.chat_template or "")))


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Gives a tokenizer without a chat template tiny-chat's ChatML-style one (with generation
    markers); True when it had to. The adapter's saved tokenizer carries the template it trained with."""
    if tokenizer.chat_template:
        return False
    from tuneforge.training.tiny_chat import CHAT_TEMPLATE

    tokenizer.chat_template = CHAT_TEMPLATE
    return True


def template_honours_weight(tokenizer: PreTrainedTokenizerBase) -> bool:
    return has_generation_markers(tokenizer) and "weight" in str(tokenizer.chat_template)


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[Message], **kwargs: Any) -> dict[str, Any]:
    out: Any = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
    return dict(out)


def _chat_lengths(tokenizer: PreTrainedTokenizerBase, messages: list[Message]) -> tuple[int, int]:
    """(all tokens, assistant tokens in the loss) of one conversation under the model's template."""
    if has_generation_markers(tokenizer):
        out = _render(tokenizer, messages, return_assistant_tokens_mask=True)
        return len(out["input_ids"]), int(sum(out["assistant_masks"]))
    ids = _render(tokenizer, messages)["input_ids"]
    trained = sum(
        len(tokenizer(m["content"], add_special_tokens=False)["input_ids"])
        for m in messages
        if m["role"] == "assistant" and m.get("weight", 1) != 0
    )
    return len(ids), trained


def _text_length(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _pair_length(tokenizer: PreTrainedTokenizerBase, prompt: Any, answer: Any) -> tuple[int, int]:
    if isinstance(prompt, list):
        whole = _render(tokenizer, prompt + answer)["input_ids"]
        head = _render(tokenizer, prompt, add_generation_prompt=True)["input_ids"]
        return len(whole), max(0, len(whole) - len(head))
    answer_tokens = _text_length(tokenizer, answer)
    return _text_length(tokenizer, prompt) + answer_tokens, answer_tokens


def _record_lengths(stats: DataStats, lengths: list[int]) -> None:
    stats.examples = len(lengths)
    stats.tokens = sum(lengths)
    stats.min_tokens = min(lengths, default=0)
    stats.max_tokens = max(lengths, default=0)


def _first_format(path: Path) -> str:
    """The format of the file's first example ("" when it has none or the line is bad: the full
    read then says why)."""
    try:
        with path.open("rb") as handle:
            for number, raw in enumerate(handle, start=1):
                if raw.strip():
                    return detect_format(parse_line(raw, number)).value
    except ValueError:
        pass
    return ""


def read_training_file(
    path: Path,
    method: str,
    tokenizer: PreTrainedTokenizerBase,
    max_seq_length: int,
    *,
    split: str = "train",
) -> TrainingData:
    """Reads, converts and measures one file for `method` (supervised, dpo, pretraining, or one
    of the preference methods orpo, simpo, kto, reward_model), or
    takes what an earlier read of the same file made from the tokenization cache when one is
    configured (tuneforge/training/tokcache.py)."""
    from tuneforge.training import tokcache

    key = tokcache.data_key(path, tokenizer, max_seq_length, method, _first_format(path), split)
    data = tokcache.cached_training_data(
        key, lambda: _read_training_file(path, method, tokenizer, max_seq_length, split=split)
    )
    if data.warnings.get("chat_template_missing_used_chatml"):
        ensure_chat_template(tokenizer)  # as the read did: later readers and the trainer see it
    return data


def _read_training_file(
    path: Path,
    method: str,
    tokenizer: PreTrainedTokenizerBase,
    max_seq_length: int,
    *,
    split: str = "train",
) -> TrainingData:
    if method == "reinforcement":  # prompts for the grader (tuneforge.training.grpo)
        from tuneforge.training.grpo import read_prompt_file

        return read_prompt_file(path, tokenizer, max_seq_length, split=split)
    if method == "kto":  # unpaired feedback lines (issue 9): read by the KTO recipe's reader
        from tuneforge.training.preference import read_feedback_file

        return read_feedback_file(path, tokenizer, max_seq_length, split=split)
    if method in ("orpo", "simpo", "reward_model"):  # preference pairs, read as DPO reads them
        method = "dpo"
    fmt, records = read_records(path, method)
    warnings: Counter[str] = Counter()
    stats = DataStats(format=fmt.value)
    lengths: list[int] = []
    rows: list[dict[str, Any]] = []

    conversational = fmt in (DataFormat.CHAT, DataFormat.ALPACA, DataFormat.SHAREGPT)
    conversational |= fmt is DataFormat.PREFERENCE_OPENAI or (
        fmt is DataFormat.PREFERENCE
        and not all(isinstance(records[0].get(k, ""), str) for k in ("prompt", "chosen"))
    )
    if conversational and ensure_chat_template(tokenizer):
        warnings["chat_template_missing_used_chatml"] += 1

    if method == "supervised":
        honours_weight = template_honours_weight(tokenizer)
        for record in records:
            row = _convert_supervised(fmt, record)
            if "messages" in row:
                assistants = [m for m in row["messages"] if m["role"] == "assistant"]
                warnings["empty_assistant_turns"] += sum(1 for m in assistants if not m["content"].strip())
                weight_zero = sum(1 for m in assistants if m["weight"] == 0)
                if weight_zero and not honours_weight:
                    warnings["weight_zero_not_honoured"] += weight_zero
                if honours_weight and all(m["weight"] == 0 for m in assistants):
                    warnings["examples_without_trained_tokens"] += 1
                    continue
                n_tokens, trained = _chat_lengths(tokenizer, row["messages"])
            else:
                n_tokens = _text_length(tokenizer, row["prompt"] + row["completion"]) + 1  # + EOS
                trained = _text_length(tokenizer, row["completion"]) + 1
                if not row["completion"].strip():
                    warnings["empty_completions"] += 1
            if n_tokens > max_seq_length:
                warnings["truncated_examples"] += 1
            stats.trained_tokens += trained
            lengths.append(n_tokens)
            rows.append(row)
        kind = "conversational" if rows and "messages" in rows[0] else "prompt_completion"
    elif method == "dpo":
        for record in records:
            row = _convert_preference(fmt, record)
            if row["chosen"] == row["rejected"]:
                warnings["identical_preference_pairs"] += 1
            chosen_len, chosen_trained = _pair_length(tokenizer, row["prompt"], row["chosen"])
            rejected_len, _ = _pair_length(tokenizer, row["prompt"], row["rejected"])
            if max(chosen_len, rejected_len) > max_seq_length:
                warnings["truncated_examples"] += 1
            stats.trained_tokens += chosen_trained
            lengths.append(max(chosen_len, rejected_len))
            rows.append(row)
        kind = "preference"
    elif method == "pretraining":
        for record in records:
            n_tokens = _text_length(tokenizer, record["text"]) + 1  # + EOS
            if n_tokens > max_seq_length:
                # Packing with "bfd_split" splits a long text across rows: nothing is lost, but say so.
                warnings["split_examples"] += 1
            stats.trained_tokens += n_tokens
            lengths.append(n_tokens)
            rows.append({"text": record["text"]})
        kind = "text"
    else:
        raise ValueError(f"unknown method {method!r}")

    if not rows:
        raise DataError(f"{path.name}: no {split} example has anything to train on")
    _record_lengths(stats, lengths)
    return TrainingData(kind=kind, rows=rows, stats=stats, warnings=+warnings)
