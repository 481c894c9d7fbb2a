"""What an evaluation answers and what its grader reads, per validation line format (no model)."""

from __future__ import annotations

import json
from pathlib import Path

from tuneforge.training.evaluation import eval_item, read_items

USER = {"role": "user", "content": "Capital of France?"}


def test_a_chat_line_answers_its_prompt_and_the_grader_reads_the_last_assistant_turn() -> None:
    record = {
        "messages": [
            {"role": "system", "content": "Briefly."},
            USER,
            {"role": "assistant", "content": "Paris."},
        ],
        "country": "France",
    }
    item = eval_item(record)
    assert item is not None
    assert item.prompt == [{"role": "system", "content": "Briefly."}, USER]
    assert item.reference == "Paris."
    assert item.item == {"country": "France", "reference": "Paris."}


def test_other_formats() -> None:
    completion = eval_item({"prompt": "Q: 2+2? A:", "completion": " 4"})
    assert completion is not None and completion.prompt == "Q: 2+2? A:" and completion.reference == " 4"
    alpaca = eval_item({"instruction": "Add", "input": "2+2", "output": "4"})
    assert alpaca is not None and alpaca.prompt == [{"role": "user", "content": "Add\n\n2+2"}]
    preference = eval_item(
        {
            "input": {"messages": [USER]},
            "preferred_output": [{"role": "assistant", "content": "Paris."}],
            "non_preferred_output": [{"role": "assistant", "content": "Lyon."}],
        }
    )
    assert preference is not None and preference.prompt == [USER] and preference.reference == "Paris."
    open_ended = eval_item({"messages": [USER], "answer": "Paris"})  # RFT-style: no assistant turn
    assert open_ended is not None and open_ended.reference is None and open_ended.item["answer"] == "Paris"
    assert eval_item({"text": "raw text"}) is None


def test_read_items_takes_the_first_max_samples(tmp_path: Path) -> None:
    line = {"messages": [USER, {"role": "assistant", "content": "Paris."}]}
    path = tmp_path / "valid.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for _ in range(5)))
    assert len(read_items(path, 3)) == 3
