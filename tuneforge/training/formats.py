"""Training-data formats: detection and line-by-line checks of JSONL files.

Pure Python, no torch: the API streams uploads through `JsonlInspector` to refuse a bad file
with the first bad line's number, and the training readers use `detect_format` to convert
records. The formats are the ones CONTRACT.md lists.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class DataFormat(StrEnum):
    CHAT = "chat"  # OpenAI {"messages": [...]}
    PROMPT_COMPLETION = "prompt_completion"  # {"prompt", "completion"}
    ALPACA = "alpaca"  # {"instruction", "input", "output"}
    SHAREGPT = "sharegpt"  # {"conversations": [{"from", "value"}]}
    PREFERENCE_OPENAI = "preference_openai"  # {"input": {"messages"}, "preferred_output", ...}
    PREFERENCE = "preference"  # {"prompt", "chosen", "rejected"}
    TEXT = "text"  # {"text"}
    KTO = "kto"  # {"prompt", "completion", "label": bool} (unpaired feedback)
    KTO_CHAT = "kto_chat"  # OpenAI {"messages": [...], "label": bool}
    REINFORCEMENT = "reinforcement"  # OpenAI RFT: {"messages": [..., user], <item fields>...}


METHOD_FORMATS: dict[str, frozenset[DataFormat]] = {
    "supervised": frozenset(
        {DataFormat.CHAT, DataFormat.PROMPT_COMPLETION, DataFormat.ALPACA, DataFormat.SHAREGPT}
    ),
    "dpo": frozenset({DataFormat.PREFERENCE_OPENAI, DataFormat.PREFERENCE}),
    "pretraining": frozenset({DataFormat.TEXT}),
    "orpo": frozenset({DataFormat.PREFERENCE_OPENAI, DataFormat.PREFERENCE}),
    "simpo": frozenset({DataFormat.PREFERENCE_OPENAI, DataFormat.PREFERENCE}),
    "reward_model": frozenset({DataFormat.PREFERENCE_OPENAI, DataFormat.PREFERENCE}),
    "kto": frozenset({DataFormat.KTO, DataFormat.KTO_CHAT}),
    "reinforcement": frozenset({DataFormat.REINFORCEMENT}),
}
#: Formats of unpaired feedback, each with the format its lines have without `label`. Only a kto
#: job reads `label`: for every other method it is one more key of a chat or prompt/completion line.
KTO_FORMATS = {DataFormat.KTO: DataFormat.PROMPT_COMPLETION, DataFormat.KTO_CHAT: DataFormat.CHAT}
LABEL_MISSING = 'label is missing: every line of unpaired feedback (KTO) needs "label": true or false'
LABEL_NOT_BOOLEAN = "label must be true (desirable) or false (undesirable)"

CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "tool": "tool",
    "function_call": "assistant",
    "observation": "tool",
}

# A rough count, good for estimates and "auto" rules before a tokenizer is at hand.
CHARS_PER_TOKEN = 4


class FormatError(ValueError):
    """A line that does not parse or fits no format. `line` is 1-based."""

    def __init__(self, line: int, message: str) -> None:
        message = message.replace("\x00", "\\u0000")  # it may quote the file; PostgreSQL text holds no NUL
        super().__init__(f"line {line}: {message}")
        self.line = line
        self.reason = message


def _check_messages(messages: Any, where: str, need_assistant: bool) -> int:
    """Checks an OpenAI message list; returns its character count."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where} must be a non-empty list of messages")
    chars = 0
    has_assistant = False
    for i, message in enumerate(messages):
        at = f"{where}[{i}]"
        if not isinstance(message, dict):
            raise ValueError(f"{at} must be an object")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise ValueError(f"{at}.role must be one of {', '.join(sorted(CHAT_ROLES))}, not {role!r}")
        content = message.get("content")
        if content is None and not (role == "assistant" and message.get("tool_calls")):
            raise ValueError(f"{at}.content is missing")
        if content is not None and not isinstance(content, str):
            if not (isinstance(content, list) and all(isinstance(p, dict) for p in content)):
                raise ValueError(f"{at}.content must be a string")
            content = "".join(str(p.get("text", "")) for p in content)
        if "weight" in message:
            if role != "assistant":
                raise ValueError(f"{at}.weight is only allowed on assistant messages")
            if message["weight"] not in (0, 1) or isinstance(message["weight"], bool):
                raise ValueError(f"{at}.weight must be 0 or 1")
        if role == "assistant":
            has_assistant = True
        chars += len(content or "")
    if need_assistant and not has_assistant:
        raise ValueError(f"{where} has no assistant message to learn from")
    return chars


def _str_field(record: dict[str, Any], name: str, allow_empty: bool = True) -> str:
    value = record.get(name)
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string")
    if not allow_empty and not value.strip():
        raise ValueError(f"{name} must not be empty")
    return value


def _preference_side(record: dict[str, Any], name: str) -> int:
    value = record.get(name)
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return _check_messages(value, name, need_assistant=False)
    raise ValueError(f"{name} must be a string or a list of messages")


def detect_format(record: Any, method: str | None = None) -> DataFormat:
    """The format of one parsed line, by its keys, as `method` reads it: a chat or prompt/completion
    line with `label` is unpaired feedback (kto, kto_chat) for a kto job or when no method is
    given, and plain chat or prompt/completion data (`label` an extra key) for every other method.
    Raises ValueError naming what is off."""
    fmt = _detect(record)
    if method is not None and method != "kto":
        return KTO_FORMATS.get(fmt, fmt)
    return fmt


def plain_format(fmt: DataFormat) -> DataFormat:
    """The format a line of `fmt` has for every method but kto (`label` read as an extra key)."""
    return KTO_FORMATS.get(fmt, fmt)


def _detect(record: Any) -> DataFormat:
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record and _ends_with_user(record["messages"]):
        return DataFormat.REINFORCEMENT  # a `label` here is one of the grader's item fields
    if "messages" in record:
        return DataFormat.KTO_CHAT if "label" in record else DataFormat.CHAT
    if "preferred_output" in record or "non_preferred_output" in record:
        return DataFormat.PREFERENCE_OPENAI
    if "chosen" in record or "rejected" in record:
        return DataFormat.PREFERENCE
    if "conversations" in record:
        return DataFormat.SHAREGPT
    if "instruction" in record and "output" in record:
        return DataFormat.ALPACA
    if "prompt" in record and "completion" in record:
        return DataFormat.KTO if "label" in record else DataFormat.PROMPT_COMPLETION
    if "text" in record:
        return DataFormat.TEXT
    keys = ", ".join(sorted(record)) or "none"
    raise ValueError(
        f"fits no known format (keys: {keys}); expected messages, prompt/completion, "
        "instruction/output, conversations, input/preferred_output/non_preferred_output, "
        "prompt/chosen/rejected or text"
    )


def _ends_with_user(messages: Any) -> bool:
    """A prompt for reinforcement fine-tuning: chat messages whose last one is the user's and that
    hold no assistant message (a line with one still trains supervised, as it always did)."""
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
        return False
    roles = [m.get("role") for m in messages if isinstance(m, dict)]
    return messages[-1].get("role") == "user" and "assistant" not in roles


def check_record(record: Any, fmt: DataFormat) -> int:
    """Validates one record of a known format; returns its character count."""
    if fmt is DataFormat.CHAT:
        return _check_messages(record["messages"], "messages", need_assistant=True)
    if fmt is DataFormat.PROMPT_COMPLETION:
        return len(_str_field(record, "prompt")) + len(_str_field(record, "completion"))
    if fmt is DataFormat.ALPACA:
        extra = record.get("input", "")
        if not isinstance(extra, str):
            raise ValueError("input must be a string")
        return (
            len(_str_field(record, "instruction", allow_empty=False))
            + len(extra)
            + len(_str_field(record, "output"))
        )
    if fmt is DataFormat.SHAREGPT:
        turns = record["conversations"]
        if not isinstance(turns, list) or not turns:
            raise ValueError("conversations must be a non-empty list")
        chars = 0
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict) or turn.get("from") not in SHAREGPT_ROLES:
                raise ValueError(
                    f"conversations[{i}].from must be one of {', '.join(sorted(SHAREGPT_ROLES))}"
                )
            if not isinstance(turn.get("value"), str):
                raise ValueError(f"conversations[{i}].value must be a string")
            chars += len(turn["value"])
        if not any(SHAREGPT_ROLES[t["from"]] == "assistant" for t in turns):
            raise ValueError("conversations has no gpt/assistant turn to learn from")
        return chars
    if fmt is DataFormat.PREFERENCE_OPENAI:
        source = record.get("input")
        if not isinstance(source, dict):
            raise ValueError("input must be an object with messages")
        chars = _check_messages(source.get("messages"), "input.messages", need_assistant=False)
        for name in ("preferred_output", "non_preferred_output"):
            output = record.get(name)
            if not isinstance(output, list) or len(output) != 1:
                raise ValueError(f"{name} must be a list of exactly one assistant message")
            chars += _check_messages(output, name, need_assistant=True)
        return chars
    if fmt is DataFormat.PREFERENCE:
        prompt = record.get("prompt", "")
        chars = (
            _check_messages(prompt, "prompt", need_assistant=False)
            if isinstance(prompt, list)
            else len(prompt)
            if isinstance(prompt, str)
            else -1
        )
        if chars < 0:
            raise ValueError("prompt must be a string or a list of messages")
        return chars + _preference_side(record, "chosen") + _preference_side(record, "rejected")
    if fmt is DataFormat.TEXT:
        return len(_str_field(record, "text", allow_empty=False))
    if fmt is DataFormat.REINFORCEMENT:  # every other top-level field is the grader's item
        return _check_messages(record["messages"], "messages", need_assistant=False)
    if fmt in KTO_FORMATS:
        if not isinstance(record.get("label"), bool):
            raise ValueError(LABEL_NOT_BOOLEAN)
        return check_record(record, KTO_FORMATS[fmt])
    raise AssertionError(fmt)


def mixed_formats(line_format: DataFormat, earlier: DataFormat) -> str:
    """Why a line of `line_format` cannot follow lines of `earlier`; names a missing KTO label."""
    if earlier is DataFormat.REINFORCEMENT and line_format is DataFormat.CHAT:
        return "the last message is not from the user: every line of reinforcement prompts ends with one"
    if earlier is DataFormat.CHAT and line_format is DataFormat.REINFORCEMENT:
        return "has no assistant message to learn from (it is a reinforcement prompt)"
    if KTO_FORMATS.get(earlier) is line_format:
        return LABEL_MISSING
    return f"is {line_format.value} but earlier lines are {earlier.value}"


def parse_line(raw: bytes | str, line: int) -> Any:
    """Parses one JSONL line, raising FormatError with the line number: also for what the JSON
    parser refuses outside the grammar (nesting deeper than the interpreter's recursion limit,
    integers longer than its int-string conversion limit)."""
    try:
        return json.loads(raw)
    except UnicodeDecodeError as exc:
        raise FormatError(line, f"not valid UTF-8 ({exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise FormatError(line, f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise FormatError(line, "nested too deeply") from None
    except ValueError as exc:
        if "integer string conversion" in str(exc):
            limit = sys.get_int_max_str_digits()
            raise FormatError(line, f"an integer has more than {limit} digits") from None
        raise FormatError(line, f"not valid JSON ({exc})") from None


@dataclass
class FieldStats:
    """Which top-level keys the lines of a file have, recorded at upload (the file row's `fields`)
    so that job creation can name the first line lacking one that the method needs (a grader's
    `{{item.<key>}}`, KTO's `label`) without reading the file again.

    `keys` maps a key to `[lines that have it, first line that lacks it or None]`. At most
    `MAX_KEYS` keys of up to `MAX_KEY_CHARS` characters are followed; when a line holds another,
    `complete` is false and a key absent from `keys` may still be in some line (the worker's read
    of the file then decides). Line numbers are 1-based, blank lines counted.
    """

    MAX_KEYS = 64
    MAX_KEY_CHARS = 256

    lines: int = 0
    first_line: int | None = None
    keys: dict[str, list[int | None]] = field(default_factory=dict)
    complete: bool = True
    label_not_boolean: int | None = None  # the first line whose label is not true or false

    def observe(self, record: dict[str, Any], line: int) -> None:
        if self.first_line is None:
            self.first_line = line
        for key in record:
            entry = self.keys.get(key)
            if entry is None:
                if len(self.keys) >= self.MAX_KEYS or not _storable_key(key, self.MAX_KEY_CHARS):
                    self.complete = False
                    continue
                entry = self.keys[key] = [0, self.first_line if self.lines else None]
            entry[0] = (entry[0] or 0) + 1
        for key, entry in self.keys.items():
            if entry[1] is None and key not in record:
                entry[1] = line
        if "label" in record and not isinstance(record["label"], bool) and self.label_not_boolean is None:
            self.label_not_boolean = line
        self.lines += 1

    def first_line_lacking(self, key: str) -> int | None:
        """The first line without `key` (0 when none can be named: not followed), or None when
        every line has it."""
        entry = self.keys.get(key)
        if entry is None:
            return (self.first_line or 1) if self.complete else 0
        return entry[1]

    def as_dict(self) -> dict[str, Any]:
        return {
            "lines": self.lines,
            "first_line": self.first_line,
            "keys": self.keys,
            "complete": self.complete,
            "label_not_boolean": self.label_not_boolean,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FieldStats:
        return cls(
            lines=int(data.get("lines", 0)),
            first_line=data.get("first_line"),
            keys={str(k): list(v) for k, v in dict(data.get("keys", {})).items()},
            complete=bool(data.get("complete", False)),
            label_not_boolean=data.get("label_not_boolean"),
        )


def _storable_key(key: str, max_chars: int) -> bool:
    """A key worth recording and safe in any JSON column: short, no NUL (PostgreSQL's text and
    jsonb refuse it), encodable as UTF-8 (a lone surrogate from a `\\ud800` escape is not)."""
    if len(key) > max_chars or "\x00" in key:
        return False
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass
class FileStats:
    format: DataFormat
    examples: int
    approx_tokens: int
    fields: FieldStats = field(default_factory=FieldStats)


@dataclass
class JsonlInspector:
    """Checks a JSONL stream chunk by chunk, in constant memory (one line at a time).

    `feed` raises FormatError at the first bad line, and at a line longer than `max_line_bytes`
    (None: no limit) as soon as that many bytes of it have arrived; `finish` returns the
    statistics. Blank lines are skipped but counted, so line numbers match an editor's. Each byte
    is scanned for a newline once, however the lines are split across chunks.
    """

    max_line_bytes: int | None = None
    format: DataFormat | None = None  # of the lines read so far, `label` an extra key
    fields: FieldStats = field(default_factory=FieldStats)
    examples: int = 0
    chars: int = 0
    _line: int = 0
    _pending: bytearray = field(default_factory=bytearray)

    def feed(self, chunk: bytes) -> None:
        scanned = len(self._pending)
        self._pending += chunk
        start = 0
        while (end := self._pending.find(b"\n", max(start, scanned))) != -1:
            self._check_length(end - start)
            self._take(bytes(self._pending[start:end]))
            start = end + 1
        del self._pending[:start]
        self._check_length(len(self._pending))

    def _check_length(self, length: int) -> None:
        if self.max_line_bytes is not None and length > self.max_line_bytes:
            raise FormatError(
                self._line + 1, f"the line is longer than the limit of {self.max_line_bytes} bytes"
            )

    def finish(self) -> FileStats:
        if self._pending:
            self._take(bytes(self._pending))
            self._pending.clear()
        if self.format is None:
            raise FormatError(max(self._line, 1), "the file holds no examples")
        return FileStats(
            self.file_format(), self.examples, max(1, self.chars // CHARS_PER_TOKEN), self.fields
        )

    def file_format(self) -> DataFormat:
        """The lines' format; unpaired feedback (kto, kto_chat) when every line has a boolean
        `label` (any method but kto reads them as chat or prompt/completion lines all the same)."""
        assert self.format is not None
        labelled = self.fields.first_line_lacking("label") is None and self.fields.label_not_boolean is None
        feedback = {plain: kto for kto, plain in KTO_FORMATS.items()}
        return feedback[self.format] if labelled and self.format in feedback else self.format

    def _take(self, raw: bytes) -> None:
        self._line += 1
        if not raw.strip():
            return
        record = parse_line(raw, self._line)
        try:
            # Unknown method: `label` is checked per method at job creation from `fields`.
            fmt = detect_format(record, method="supervised")
            if self.format is not None and fmt is not self.format:
                raise ValueError(mixed_formats(fmt, self.format))
            self.chars += check_record(record, fmt)
        except ValueError as exc:
            raise FormatError(self._line, str(exc)) from None
        self.format = fmt
        self.fields.observe(record, self._line)
        self.examples += 1


def inspect_lines(lines: list[str] | list[bytes]) -> FileStats:
    """Convenience for small in-memory data (tests, the by-hand training entry point)."""
    inspector = JsonlInspector()
    for raw in lines:
        inspector.feed(raw if isinstance(raw, bytes) else raw.encode())
        inspector.feed(b"\n")
    return inspector.finish()
