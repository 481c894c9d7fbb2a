"""Readers: every format into TRL's dataset types; awkward data counted, not fatal."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tests.training.conftest import DATA, make_spec, train, write_jsonl
from tuneforge.training.data import DataError, read_training_file


@pytest.fixture(scope="module")
def tokenizer(tiny_chat_path: Path):  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(tiny_chat_path)


def test_supervised_formats_become_conversations_or_prompt_completion(tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    chat = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Skip", "weight": 0},
                    {"role": "user", "content": "Again"},
                    {"role": "assistant", "content": "Learn"},
                ]
            }
        ],
    )
    data = read_training_file(chat, "supervised", tokenizer, 1024)
    assert data.kind == "conversational"
    assert [m["weight"] for m in data.rows[0]["messages"]] == [1, 0, 1, 1]
    assert data.stats.trained_tokens == len(
        tokenizer("Learn<|im_end|>", add_special_tokens=False)["input_ids"]
    )

    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add", "input": "2 and 3", "output": "5"}])
    rows = read_training_file(alpaca, "supervised", tokenizer, 1024).rows
    assert rows[0]["messages"][0] == {"role": "user", "content": "Add\n\n2 and 3", "weight": 1}
    assert rows[0]["messages"][1]["content"] == "5"

    sharegpt = write_jsonl(
        tmp_path / "s.jsonl",
        [{"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}],
    )
    rows = read_training_file(sharegpt, "supervised", tokenizer, 1024).rows
    assert [m["role"] for m in rows[0]["messages"]] == ["user", "assistant"]

    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "2+2=", "completion": "4"}])
    data = read_training_file(pc, "supervised", tokenizer, 1024)
    assert data.kind == "prompt_completion" and data.rows == [{"prompt": "2+2=", "completion": "4"}]


def test_preference_and_text_formats(tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = read_training_file(DATA / "preferences.jsonl", "dpo", tokenizer, 1024)
    assert data.kind == "preference"
    row = data.rows[0]
    assert row["prompt"][-1]["role"] == "user"
    assert row["chosen"] == [{"role": "assistant", "content": "Paris."}]
    plain = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Sky?", "chosen": "Blue", "rejected": "Red"}])
    assert read_training_file(plain, "dpo", tokenizer, 1024).rows == [
        {"prompt": "Sky?", "chosen": "Blue", "rejected": "Red"}
    ]
    text = read_training_file(DATA / "corpus.jsonl", "pretraining", tokenizer, 1024)
    assert text.kind == "text" and text.stats.examples == 12


def test_bad_files_name_the_line_and_the_method(tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 3, "completion": "b"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl: line 2: prompt must be a string"):
        read_training_file(bad, "supervised", tokenizer, 1024)
    with pytest.raises(DataError, match=r"chat data cannot train method 'dpo'"):
        read_training_file(DATA / "qa.jsonl", "dpo", tokenizer, 1024)


def test_awkward_supervised_data_is_counted_and_trains(tiny_chat_path: Path, tmp_path: Path) -> None:
    long_answer = " ".join(["word"] * 200)
    records = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
        {"messages": [{"role": "user", "content": "Long?"}, {"role": "assistant", "content": long_answer}]},
        {"messages": [{"role": "user", "content": "Empty?"}, {"role": "assistant", "content": ""}]},
        {
            "messages": [
                {"role": "user", "content": "Skip?"},
                {"role": "assistant", "content": "No", "weight": 0},
            ]
        },
    ]
    path = write_jsonl(tmp_path / "awkward.jsonl", records)
    spec = make_spec(max_steps=2, batch_size=2, max_seq_length=64)
    result = train(spec, tiny_chat_path, path, tmp_path / "run").result
    assert result.warnings == {
        "truncated_examples": 1,
        "empty_assistant_turns": 1,
        "examples_without_trained_tokens": 1,
    }
    assert result.report["data"]["train"]["examples"] == 3
    assert result.final_step == 2 and result.adapter_dir is not None
    assert "truncated_examples" in (result.adapter_dir / "README.md").read_text()


def test_identical_preference_pairs_are_counted(tiny_chat_path: Path, tmp_path: Path) -> None:
    records = [
        {"prompt": "Sky?", "chosen": "Blue.", "rejected": "Red."},
        {"prompt": "Grass?", "chosen": "Green.", "rejected": "Green."},
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    result = train(make_spec("dpo", max_steps=1, batch_size=2), tiny_chat_path, path, tmp_path / "run").result
    assert result.warnings == {"identical_preference_pairs": 1}
    assert result.final_step == 1


def _copy_with_template(tiny_chat_path: Path, into: Path, template: str | None) -> Path:
    import shutil

    target = into / "model"
    shutil.copytree(tiny_chat_path, target)
    jinja = target / "chat_template.jinja"
    if template is None:
        jinja.unlink()
    else:
        jinja.write_text(template)
    return target


def test_templates_without_generation_markers_train_whole_conversations(
    tiny_chat_path: Path, tmp_path: Path
) -> None:
    plain_chatml = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    model_dir = _copy_with_template(tiny_chat_path, tmp_path, plain_chatml)
    records = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Skip", "weight": 0},
                {"role": "user", "content": "Again"},
                {"role": "assistant", "content": "Hello again."},
            ]
        },
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", records)
    result = train(make_spec(max_steps=1, batch_size=2), model_dir, path, tmp_path / "run").result
    assert result.warnings == {"assistant_only_loss_unavailable": 1, "weight_zero_not_honoured": 1}
    assert result.final_step == 1


def test_a_tokenizer_without_chat_template_gets_chatml(tiny_chat_path: Path, tmp_path: Path) -> None:
    model_dir = _copy_with_template(tiny_chat_path, tmp_path, None)
    result = train(
        make_spec(max_steps=1, batch_size=4), model_dir, DATA / "qa.jsonl", tmp_path / "run"
    ).result
    assert result.warnings == {"chat_template_missing_used_chatml": 1}
    assert result.adapter_dir is not None and (result.adapter_dir / "chat_template.jinja").is_file()
