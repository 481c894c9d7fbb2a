from __future__ import annotations

import json
from typing import Any

import pytest

from tuneforge.training.formats import (
    DataFormat,
    FieldStats,
    FormatError,
    JsonlInspector,
    detect_format,
    inspect_lines,
)


@pytest.mark.parametrize(
    ("record", "fmt"),
    [
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "chat"),
        ({"prompt": "a", "completion": "b"}, "prompt_completion"),
        ({"instruction": "a", "input": "", "output": "b"}, "alpaca"),
        ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}, "sharegpt"),
        (
            {
                "input": {"messages": [{"role": "user", "content": "a"}]},
                "preferred_output": [{"role": "assistant", "content": "b"}],
                "non_preferred_output": [{"role": "assistant", "content": "c"}],
            },
            "preference_openai",
        ),
        ({"prompt": "a", "chosen": "b", "rejected": "c"}, "preference"),
        ({"text": "hello"}, "text"),
    ],
)
def test_detects_each_format(record: dict[str, object], fmt: str) -> None:
    stats = inspect_lines([json.dumps(record)] * 3)
    assert stats.format == DataFormat(fmt)
    assert stats.examples == 3


def test_bad_json_names_the_line_across_chunk_boundaries() -> None:
    inspector = JsonlInspector()
    inspector.feed(b'{"text": "one"}\n{"text": "t')
    with pytest.raises(FormatError) as err:
        inspector.feed(b'wo"}\n{"text": oops}\n')
    assert err.value.line == 3
    assert "line 3" in str(err.value)


def test_mixed_formats_and_unknown_keys_are_refused() -> None:
    with pytest.raises(FormatError, match="line 2: is prompt_completion"):
        inspect_lines(['{"text": "a"}', '{"prompt": "a", "completion": "b"}'])
    with pytest.raises(FormatError, match="line 1: fits no known format"):
        inspect_lines(['{"foo": 1}'])
    with pytest.raises(FormatError, match=r"messages\[0\]\.role"):
        inspect_lines(['{"messages": [{"role": "robot", "content": "x"}]}'])


class _CountingBuffer(bytearray):
    """A bytearray that counts the bytes its `find` calls look through."""

    scanned = 0

    def find(self, sub: Any, start: Any = 0, *args: Any) -> int:
        found = super().find(sub, start, *args)
        _CountingBuffer.scanned += (found if found != -1 else len(self)) - (start or 0)
        return found


def test_a_long_line_in_small_chunks_is_scanned_once() -> None:
    """Each byte is looked at once for a newline, however many chunks a line spans (a 256 MiB line
    used to be rescanned from its start on every chunk)."""
    inspector = JsonlInspector()
    inspector._pending = _CountingBuffer()
    _CountingBuffer.scanned = 0
    line = json.dumps({"text": "x" * (4 << 20)}).encode() + b"\n"
    fed = 0
    for start in range(0, len(line), 4096):
        inspector.feed(line[start : start + 4096])
        fed += len(line[start : start + 4096])
    inspector.feed(b'{"text": "y"}\n')
    assert inspector.finish().examples == 2
    assert _CountingBuffer.scanned <= fed + 64


def test_line_length_limit_names_the_line() -> None:
    inspector = JsonlInspector(max_line_bytes=100)
    inspector.feed(b'{"text": "ok"}\n\n')
    with pytest.raises(FormatError) as refused:
        for _ in range(10):
            inspector.feed(b"y" * 30)
    assert refused.value.line == 3
    assert "longer than the limit of 100 bytes" in refused.value.reason


def test_a_nul_quoted_from_the_file_is_escaped_in_the_message() -> None:
    with pytest.raises(FormatError) as refused:
        inspect_lines(['{"a\\u0000b": 1}'])
    assert "\x00" not in str(refused.value) and "a\\u0000b" in refused.value.reason


CHAT = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Yo."}]}
PROMPT = {"messages": [{"role": "user", "content": "Hi?"}]}


def test_label_is_read_by_kto_alone() -> None:
    """A chat or prompt/completion line's `label` makes unpaired feedback only for kto: a file
    whose lines all carry a boolean one is recorded as kto/kto_chat, one whose lines mix it is a
    chat file all the same (the field statistics name the first line without it)."""
    labelled = {**CHAT, "label": True}
    assert inspect_lines([json.dumps(labelled)] * 2).format is DataFormat.KTO_CHAT
    mixed = inspect_lines([json.dumps(labelled), "", json.dumps(CHAT)])
    assert mixed.format is DataFormat.CHAT
    assert (
        mixed.fields.first_line_lacking("label") == 3 and mixed.fields.first_line_lacking("messages") is None
    )
    odd = inspect_lines([json.dumps({"prompt": "a", "completion": "b", "label": "yes"})])
    assert odd.format is DataFormat.PROMPT_COMPLETION and odd.fields.label_not_boolean == 1
    assert detect_format(labelled) is DataFormat.KTO_CHAT
    assert detect_format(labelled, "kto") is DataFormat.KTO_CHAT
    assert detect_format(labelled, "supervised") is DataFormat.CHAT
    # A reinforcement prompt's label is one of the grader's item fields.
    rft = inspect_lines([json.dumps({**PROMPT, "label": "positive"})] * 2)
    assert rft.format is DataFormat.REINFORCEMENT and rft.fields.first_line_lacking("label") is None


def test_field_statistics_name_the_first_line_lacking_a_key() -> None:
    lines = [{**PROMPT, "a": 1}, {**PROMPT, "a": 1, "b": 2}, {**PROMPT, "b": 2}]
    fields = inspect_lines([json.dumps(line) for line in lines]).fields
    assert fields.first_line_lacking("a") == 3 and fields.first_line_lacking("b") == 1
    assert fields.first_line_lacking("nowhere") == 1  # complete: no line has it
    many = {**PROMPT, **{f"k{i}": i for i in range(FieldStats.MAX_KEYS + 5)}}
    capped = inspect_lines([json.dumps(many)]).fields
    assert not capped.complete and len(capped.keys) == FieldStats.MAX_KEYS
    assert capped.first_line_lacking("k68") == 0  # not followed: the worker's read decides
    assert FieldStats.from_dict(json.loads(json.dumps(fields.as_dict()))) == fields


def test_keys_unsafe_to_store_are_not_followed() -> None:
    line = '{"messages": [{"role": "user", "content": "a"}], "\\ud800": 1, "a\\u0000b": 2, "ok": 3}'
    fields = inspect_lines([line]).fields
    assert set(fields.keys) == {"messages", "ok"} and not fields.complete
    json.dumps(fields.as_dict(), ensure_ascii=False).encode()  # UTF-8 all through
