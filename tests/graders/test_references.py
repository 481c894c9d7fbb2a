"""What a grader reads from the item, each named by the grader field that reads it: the templates
of every grader kind (nested in multi graders, in score_model messages) and a python grader's
certain `item["key"]` reads (guarded or computed ones are not claimed)."""

from __future__ import annotations

from tuneforge.graders.references import item_references, python_item_keys


def _refs(grader: object) -> list[tuple[str, str]]:
    return [(".".join(r.segments), r.param) for r in item_references(grader)]


def test_templates_anywhere_in_a_grader_are_named_by_their_field() -> None:
    check = {"type": "string_check", "name": "{{item.not_rendered}}", "input": "{{sample.output_text}}",
             "reference": "{{ item.answer.0 }}", "operation": "eq"}  # fmt: skip
    assert _refs(check) == [("answer.0", "reference")]
    score = {
        "type": "score_model",
        "name": "judge",
        "model": "m",
        "input": [{"role": "user", "content": "Q: {{item.question}} A: {{sample.output_text}}"}],
    }
    multi = {"type": "multi", "calculate_output": "a + b", "graders": {"a": check, "b": score}}
    assert _refs(multi) == [("answer.0", "graders.a.reference"), ("question", "graders.b.input[0].content")]
    assert _refs({**multi, "graders": check}) == [("answer.0", "graders.reference")]  # one sub-grader


def test_python_grader_reads_only_where_certain() -> None:
    source = (
        "import json\n"
        "def grade(sample, row):\n"
        '    """Doc."""\n'
        '    wanted = row["answer"].strip() + row["unit"]\n'
        '    bonus = row["maybe"] if "maybe" in row else 0\n'
        '    extra = row.get("optional")\n'
        '    if sample["output_text"] == wanted:\n'
        '        return float(row["after_if"])\n'
        '    return float(row["after"])\n'
    )
    assert python_item_keys(source) == ["answer", "unit"]
    grader = {"type": "python", "name": "p", "source": source}
    assert _refs(grader) == [("answer", "source"), ("unit", "source")]
    assert item_references(grader)[0].text == "item['answer']"
    assert python_item_keys('def grade(sample, item):\n    item = {}\n    return item["x"]\n') == []
    assert python_item_keys("def grade(sample):\n    return 1\n") == []
    assert python_item_keys("not python (") == []
