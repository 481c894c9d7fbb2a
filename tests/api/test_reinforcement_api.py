"""Reinforcement jobs through the SDK are refused at creation, with a 400, when their files
cannot feed the grader: a field the grader reads that some line lacks (named by the grader field
that reads it, and the first line without it), a file whose lines are not prompts ending with the
user's message (named by its first line), and a grader the service cannot run (python graders
off, no grader model endpoint, a metric it lacks), named by its field as an evaluation's is."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from tests.api.conftest import ProjectCtx
from tuneforge.config import Settings

MODEL = "tuneforge/tiny-chat"
CHECK = {
    "type": "string_check",
    "name": "exact",
    "input": "{{sample.output_text}}",
    "reference": "{{item.answer}}",
    "operation": "eq",
}


def _prompt(n: int, **item: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": f"What is {n} + {n}?"}], **item}


def _upload(project: ProjectCtx, lines: list[Any]) -> str:
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    return project.openai.files.create(file=("rft.jsonl", data), purpose="fine-tune").id


def _create(project: ProjectCtx, training: str, grader: Any, validation: str | None = None) -> Any:
    method = {"type": "reinforcement", "reinforcement": {"grader": grader}}
    extra = {"validation_file": validation} if validation else {}
    return project.openai.fine_tuning.jobs.create(model=MODEL, training_file=training, method=method, **extra)  # type: ignore[arg-type]


def _refused(project: ProjectCtx, training: str, grader: Any, validation: str | None = None) -> Any:
    with pytest.raises(openai.BadRequestError) as refused:
        _create(project, training, grader, validation)
    return refused.value


def test_a_field_the_grader_reads_missing_from_a_line_is_a_400(project: ProjectCtx) -> None:
    good = _upload(project, [_prompt(n, answer=str(2 * n), label="sum") for n in range(1, 4)])
    job = _create(project, good, CHECK)  # a `label` beside messages is an item field like any other
    assert job.status == "validating_files"

    gap = _upload(project, [_prompt(1, answer="2"), _prompt(2, answer="4"), _prompt(3, other=1)])
    err = _refused(project, gap, CHECK)
    assert err.param == "method.reinforcement.grader.reference"
    assert "{{item.answer}}" in err.message and "line 3" in err.message and gap in err.message
    assert "'answer'" in err.message
    err = _refused(project, good, CHECK, validation=gap)  # the validation file feeds the grader too
    assert err.param == "method.reinforcement.grader.reference" and "validation file" in err.message

    judge = {**JUDGE, "input": [{"role": "user", "content": "{{item.question}}: {{sample.output_text}}"}]}
    multi = {
        "type": "multi",
        "name": "both",
        "calculate_output": "exact + judge",
        "graders": {"exact": CHECK, "judge": judge},
    }
    err = _refused(project, good, multi)
    assert err.param == "method.reinforcement.grader.graders.judge.input[0].content"
    assert "{{item.question}}" in err.message and "line 1" in err.message

    python = {
        "type": "python",
        "name": "py",
        "source": 'def grade(sample, item):\n    return float(sample["output_text"] == item["expected"])\n',
    }
    err = _refused(project, good, python)
    assert err.param == "method.reinforcement.grader.source" and "item['expected']" in err.message


def test_a_file_sent_in_parts_records_its_fields_too(project: ProjectCtx) -> None:
    """The Uploads API's file (`upload_file_chunked`, a line split across parts) is checked at
    creation as a one-request upload is."""
    lines = [_prompt(n, answer=str(2 * n)) for n in range(1, 40)] + [_prompt(40)]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    upload = project.openai.uploads.upload_file_chunked(
        file=data, filename="rft.jsonl", bytes=len(data), mime_type="application/jsonl", purpose="fine-tune",
        part_size=len(data) // 3 + 1,
    )  # fmt: skip
    assert upload.file is not None
    err = _refused(project, upload.file.id, CHECK)
    assert err.param == "method.reinforcement.grader.reference" and "line 40" in err.message


def test_keys_unsafe_to_store_are_left_to_the_worker(project: ProjectCtx) -> None:
    """A key with a NUL or a lone surrogate (`\\ud800`) is not recorded (not safe in every JSON
    column or encoder): the upload works and jobs on the file are created; a grader could read
    such a key only through a body the SDK cannot encode, and the worker's check would judge it."""
    prompt = json.dumps(_prompt(1, answer="2"))[:-1]
    data = (prompt + ', "\\ud800": 1, "a\\u0000b": 2}\n').encode() * 2
    file_id = project.openai.files.create(file=("odd.jsonl", data), purpose="fine-tune").id
    assert _create(project, file_id, CHECK).status == "validating_files"


def test_a_line_that_is_not_a_prompt_is_a_400_naming_it(project: ProjectCtx) -> None:
    answered = [
        {"messages": [*_prompt(n)["messages"], {"role": "assistant", "content": "4"}], "answer": "4"}
        for n in range(3)
    ]
    err = _refused(project, _upload(project, answered), CHECK)
    assert err.param == "training_file" and "line 1" in err.message and "reinforcement prompt" in err.message
    with pytest.raises(openai.BadRequestError) as refused:  # a prompt after answered lines: at upload
        _upload(project, [*answered, _prompt(1, answer="2")])
    assert refused.value.param == "file" and "line 4" in refused.value.message


def test_the_estimator_and_advisor_have_a_reinforcement_row(project: ProjectCtx) -> None:
    """POST /v1/fine_tuning/estimates (through the SDK's raw post): a reinforcement method, or a
    file of RFT prompts, gets the advisor's GRPO row, and the memory counts the sampled answers."""
    prompts = _upload(project, [_prompt(n, answer=str(2 * n)) for n in range(4)])

    def estimate(**body: Any) -> dict[str, Any]:
        answer = project.openai.post("/fine_tuning/estimates", body={"model": MODEL, **body}, cast_to=object)
        assert isinstance(answer, dict)
        return answer

    supervised = estimate(training_file=prompts)
    rft = estimate(
        training_file=prompts, method={"type": "reinforcement", "reinforcement": {"grader": CHECK}}
    )
    for answer in (supervised, rft):  # the prompts file alone picks the row
        assert answer["recommendation"]["stages"] == ["reinforcement"]
        assert any(r.startswith("reinforcement (GRPO)") for r in answer["recommendation"]["reasons"])
    assert rft["memory"]["activations"] > supervised["memory"]["activations"]


@pytest.mark.parametrize("adapter", ["prompt_tuning", "prefix_tuning"])
def test_a_prompt_learning_adapter_is_a_400(project: ProjectCtx, adapter: str) -> None:
    """TRL's GRPO samples with PEFT's generate, which misplaces virtual tokens under transformers 5:
    the samples would not be the adapter's answers."""
    training = _upload(project, [_prompt(n, answer=str(2 * n)) for n in range(1, 4)])
    with pytest.raises(openai.BadRequestError) as refused:
        project.openai.fine_tuning.jobs.create(
            model=MODEL,
            training_file=training,
            method={"type": "reinforcement", "reinforcement": {"grader": CHECK}},  # type: ignore[typeddict-item]
            extra_body={"adapter": {"type": adapter}},
        )
    assert refused.value.param == "adapter.type" and adapter in refused.value.message


PYTHON = {"type": "python", "name": "py", "source": "def grade(sample, item):\n    return 1.0\n"}
JUDGE = {
    "type": "score_model",
    "name": "judge",
    "model": MODEL,
    "input": [{"role": "user", "content": "Grade: {{sample.output_text}}"}],
}
COSINE = {
    "type": "text_similarity",
    "name": "close",
    "input": "{{sample.output_text}}",
    "reference": "{{item.answer}}",
    "evaluation_metric": "cosine",
}


@pytest.mark.parametrize(
    ("grader", "param", "says"),
    [
        (PYTHON, "method.reinforcement.grader.type", "TUNEFORGE_PYTHON_GRADER_ENABLED"),
        (JUDGE, "method.reinforcement.grader.type", "TUNEFORGE_GRADER_MODEL_URL"),
        (COSINE, "method.reinforcement.grader.evaluation_metric", "embedding model"),
        (
            {
                "type": "multi",
                "name": "m",
                "calculate_output": "exact + py",
                "graders": {"exact": CHECK, "py": PYTHON},
            },
            "method.reinforcement.grader.graders.py.type",
            "TUNEFORGE_PYTHON_GRADER_ENABLED",
        ),
    ],
    ids=["python-off", "score_model-without-endpoint", "cosine", "python-inside-multi"],
)
def test_a_grader_the_service_cannot_run_is_a_400_naming_it(
    project: ProjectCtx, grader: dict[str, Any], param: str, says: str
) -> None:
    """Checked at creation as an evaluation grader is: accepted, the job would be queued, load its
    model and fail at its first step when the first reward is asked for."""
    training = _upload(project, [_prompt(n, answer=str(2 * n)) for n in range(1, 4)])
    err = _refused(project, training, grader)
    assert (err.status_code, err.param, err.code) == (400, param, "grader_unavailable")
    assert says in err.message


def test_runnable_graders_are_taken_once_the_service_can_run_them(
    project: ProjectCtx, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(settings, "python_grader_enabled", True)
    monkeypatch.setattr(settings, "grader_model_url", "http://127.0.0.1:9/v1")
    training = _upload(project, [_prompt(n, answer=str(2 * n)) for n in range(1, 4)])
    for grader in (PYTHON, JUDGE):
        assert _create(project, training, grader).status == "validating_files"
