"""The graders API through the official `openai` SDK: `fine_tuning.alpha.graders.run` and
`.validate`, OpenAI's answer shapes, a 400 naming the grader's field, and the grader types this
service runs only when configured (python graders enabled, a grader model endpoint)."""

from __future__ import annotations

from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient

from tests.support.api import ProjectCtx
from tests.support.chat_stub import chat_stub
from tuneforge.config import Settings

EXACT = {
    "type": "string_check",
    "name": "exact",
    "input": "{{sample.output_text}}",
    "reference": "{{item.answer}}",
    "operation": "eq",
}


def similar(metric: str, input: str = "{{sample.output_text}}") -> dict[str, Any]:
    return {
        "type": "text_similarity",
        "name": "close",
        "input": input,
        "reference": "{{item.answer}}",
        "evaluation_metric": metric,
    }


def test_string_check_rewards_a_match_and_not_a_mismatch(project: ProjectCtx) -> None:
    graders = project.openai.fine_tuning.alpha.graders
    match = graders.run(grader=EXACT, model_sample="Paris", item={"answer": "Paris"})  # type: ignore[arg-type]
    miss = graders.run(grader=EXACT, model_sample="Lyon", item={"answer": "Paris"})  # type: ignore[arg-type]
    assert (match.reward, miss.reward) == (1.0, 0.0)
    assert match.metadata.name == "exact"
    assert match.metadata.type == "string_check"
    assert match.metadata.execution_time >= 0
    assert match.metadata.errors.invalid_variable_error is False
    assert match.metadata.errors.api_model_grader_server_error is False  # the SDK's alias
    assert match.metadata.token_usage is None
    assert match.sub_rewards == {}


def test_text_similarity_through_the_sdk(project: ProjectCtx) -> None:
    graders = project.openai.fine_tuning.alpha.graders
    item = {"answer": "The capital of France is Paris."}
    near = graders.run(
        grader=similar("fuzzy_match"), model_sample="The capitol of France is Paris", item=item
    )  # type: ignore[arg-type]
    assert 0.0 < near.reward < 1.0
    for metric in ("bleu", "rouge_1", "rouge_l"):
        same = graders.run(grader=similar(metric), model_sample=item["answer"], item=item)  # type: ignore[arg-type]
        close = graders.run(grader=similar(metric), model_sample="The capital of Spain is Madrid.", item=item)  # type: ignore[arg-type]
        assert same.reward == pytest.approx(1.0), metric
        assert 0.0 < close.reward < same.reward, metric


def test_multi_combines_two_graders(project: ProjectCtx) -> None:
    grader = {
        "type": "multi",
        "name": "both",
        "graders": {"exact": EXACT, "close": similar("fuzzy_match")},
        "calculate_output": "0.5 * exact + 0.5 * close",
    }
    result = project.openai.fine_tuning.alpha.graders.run(
        grader=grader,  # type: ignore[arg-type]
        model_sample="Pariss",
        item={"answer": "Paris"},
    )
    assert result.sub_rewards["exact"] == 0.0
    assert 0.0 < float(result.sub_rewards["close"]) < 1.0  # type: ignore[arg-type]
    assert result.reward == pytest.approx(0.5 * float(result.sub_rewards["close"]))  # type: ignore[arg-type]
    assert result.metadata.type == "multi"
    assert result.metadata.scores == result.sub_rewards


def test_templates_read_the_item_and_the_sample_as_json(project: ProjectCtx) -> None:
    grader = {**EXACT, "input": "{{sample.output_json.city}}", "reference": "{{item.expected.city}}"}
    graders = project.openai.fine_tuning.alpha.graders
    good = graders.run(grader=grader, model_sample='{"city": "Paris"}', item={"expected": {"city": "Paris"}})  # type: ignore[arg-type]
    assert good.reward == 1.0
    missing = graders.run(
        grader=grader, model_sample='{"town": "Paris"}', item={"expected": {"city": "Paris"}}
    )  # type: ignore[arg-type]
    assert missing.reward == 0.0
    assert missing.metadata.errors.invalid_variable_error is True
    not_json = graders.run(grader=grader, model_sample="Paris", item={"expected": {"city": "Paris"}})  # type: ignore[arg-type]
    assert not_json.metadata.errors.sample_parse_error is True


def test_validate_returns_the_grader(project: ProjectCtx) -> None:
    answer = project.openai.fine_tuning.alpha.graders.validate(grader=EXACT)  # type: ignore[arg-type]
    assert answer.grader is not None
    assert answer.grader.to_dict() == EXACT


@pytest.mark.parametrize("call", ["run", "validate"])
def test_a_bad_grader_is_a_400_naming_the_field(project: ProjectCtx, call: str) -> None:
    graders = project.openai.fine_tuning.alpha.graders
    kwargs: dict[str, Any] = {"model_sample": "x", "item": {}} if call == "run" else {}
    with pytest.raises(openai.BadRequestError) as refused:
        getattr(graders, call)(grader={**EXACT, "operation": "equals"}, **kwargs)
    assert refused.value.param == "grader.operation"  # type: ignore[attr-defined]
    with pytest.raises(openai.BadRequestError) as refused:
        getattr(graders, call)(
            grader={"type": "multi", "name": "m", "graders": {"a": EXACT}, "calculate_output": "a + b"},
            **kwargs,
        )
    assert refused.value.param == "grader.calculate_output"  # type: ignore[attr-defined]


PYTHON = {"type": "python", "name": "p", "source": "def grade(sample, item):\n    return 1.0\n"}
SCORE_MODEL = {
    "type": "score_model",
    "name": "judge",
    "model": "gpt-4o-mini",
    "input": [{"role": "user", "content": "Score {{sample.output_text}} against {{item.answer}}"}],
    "range": [0, 1],
}


@pytest.mark.parametrize("grader", [PYTHON, SCORE_MODEL], ids=["python", "score_model"])
def test_python_and_model_graders_validate_but_run_is_refused(
    project: ProjectCtx, grader: dict[str, Any]
) -> None:
    graders = project.openai.fine_tuning.alpha.graders
    assert graders.validate(grader=grader).grader is not None  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError) as refused:
        graders.run(grader=grader, model_sample="x", item={"answer": "x"})  # type: ignore[arg-type]
    assert refused.value.param == "grader.type"  # type: ignore[attr-defined]
    assert "an administrator" in refused.value.message


def test_meteor_runs_and_cosine_is_refused_by_name(project: ProjectCtx) -> None:
    graders = project.openai.fine_tuning.alpha.graders
    item = {"answer": "the car is red"}
    synonym = graders.run(grader=similar("meteor"), model_sample="the auto is red", item=item)  # type: ignore[arg-type]
    other = graders.run(grader=similar("meteor"), model_sample="the cow is red", item=item)  # type: ignore[arg-type]
    assert synonym.reward > 0.9 > other.reward > 0.0  # WordNet: auto is a car, a cow is not
    with pytest.raises(openai.BadRequestError) as refused:
        graders.run(grader=similar("cosine"), model_sample="x", item={"answer": "x"})  # type: ignore[arg-type]
    assert refused.value.param == "grader.evaluation_metric"  # type: ignore[attr-defined]
    assert "embedding model" in refused.value.message


def test_graders_need_a_project_key(client: TestClient) -> None:
    for path, body in [
        ("/v1/fine_tuning/alpha/graders/run", {"grader": EXACT, "model_sample": "x"}),
        ("/v1/fine_tuning/alpha/graders/validate", {"grader": EXACT}),
    ]:
        answer = client.post(path, json=body)
        assert answer.status_code == 401, answer.text
        assert answer.json()["error"]["code"] == "invalid_api_key"


def test_a_missing_sample_is_a_400(project: ProjectCtx) -> None:
    answer = project.client.post(
        "/v1/fine_tuning/alpha/graders/run", json={"grader": EXACT}, headers=project.headers
    )
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "model_sample"


@pytest.fixture
def python_graders_on(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """The administrator turns python graders on (with a short time limit for the tests)."""
    monkeypatch.setattr(settings, "python_grader_enabled", True)
    monkeypatch.setattr(settings, "python_grader_timeout_seconds", 1.0)
    monkeypatch.setattr(settings, "python_grader_memory_mb", 256)


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ("    while True:\n        pass", "time limit"),
        ("    return len(bytearray(8 << 30))", "memory limit"),
        ("    import socket\n    socket.create_connection(('127.0.0.1', 5432), timeout=2)", "not allowed"),
    ],
    ids=["loops forever", "allocates gigabytes", "opens a socket"],
)
def test_an_enabled_python_grader_that_misbehaves_is_stopped(
    project: ProjectCtx, python_graders_on: None, body: str, detail: str
) -> None:
    graders = project.openai.fine_tuning.alpha.graders
    good = {
        **PYTHON,
        "source": "def grade(sample, item):\n    return float(sample['output_text'] == item['a'])\n",
    }
    assert graders.run(grader=good, model_sample="x", item={"a": "x"}).reward == 1.0  # type: ignore[arg-type]
    bad = {**PYTHON, "source": f"def grade(sample, item):\n{body}\n"}
    result = graders.run(grader=bad, model_sample="x", item={})  # type: ignore[arg-type]
    assert result.reward == 0.0
    errors = result.metadata.errors  # type: ignore[union-attr]
    assert errors.python_grader_runtime_error is True
    assert detail in (errors.python_grader_runtime_error_details or "")


def test_model_graders_call_the_configured_endpoint(
    project: ProjectCtx, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    with chat_stub(lambda body: '{"result": 0.75}') as stub:
        monkeypatch.setattr(settings, "grader_model_url", stub.base_url)
        result = project.openai.fine_tuning.alpha.graders.run(
            grader=SCORE_MODEL,  # type: ignore[arg-type]
            model_sample="Paris",
            item={"answer": "Paris"},
        )
    assert result.reward == 0.75
    assert stub.requests[0]["messages"][-1]["content"] == "Score Paris against Paris"
