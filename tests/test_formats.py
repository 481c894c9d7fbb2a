from __future__ import annotations

import json

import pytest

from tuneforge.training.formats import DataFormat, FormatError, JsonlInspector, inspect_lines


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
