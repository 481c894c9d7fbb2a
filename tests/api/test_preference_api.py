"""Issue 9's methods through the SDK: an unpaired-feedback (KTO) file with a line lacking `label`
is a 400 naming that line; orpo, simpo, kto and reward_model jobs are accepted on their formats,
echo their method section, and a file of the wrong format for the method is a 400."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from tests.api.conftest import ProjectCtx

MODEL = "tuneforge/tiny-chat"
PAIR = {
    "input": {"messages": [{"role": "user", "content": "Hi?"}]},
    "preferred_output": [{"role": "assistant", "content": "Hello."}],
    "non_preferred_output": [{"role": "assistant", "content": "Go."}],
}
FEEDBACK = {"prompt": "Hi?", "completion": "Hello.", "label": True}


def _upload(project: ProjectCtx, lines: list[Any]) -> str:
    """A JSONL file of `lines` (None: a blank line)."""
    data = "".join((json.dumps(line) if line is not None else "") + "\n" for line in lines).encode()
    return project.openai.files.create(file=("data.jsonl", data), purpose="fine-tune").id


def _create(project: ProjectCtx, file_id: str, method: Any) -> Any:
    """A job through the SDK; `method` may name a Tuneforge method the SDK's types do not know."""
    return project.openai.fine_tuning.jobs.create(model=MODEL, training_file=file_id, method=method)


def test_kto_line_without_label_is_a_400_naming_it(project: ProjectCtx) -> None:
    """`label` is read by kto jobs alone: a file whose lines mix it uploads as chat or
    prompt/completion data, trains supervised, and a kto job on it is a 400 naming the first line
    without a boolean label."""
    unlabeled = {"prompt": "Hi?", "completion": "Go."}
    chat = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Yo."}]}
    for lines, line, reason in (
        ([FEEDBACK, unlabeled], 2, "label is missing"),
        ([{**chat, "label": False}, None, chat], 3, "label is missing"),
        ([unlabeled, FEEDBACK], 1, "label is missing"),
        ([FEEDBACK, {**FEEDBACK, "label": "yes"}], 2, "label must be true"),
    ):
        file_id = _upload(project, lines)
        with pytest.raises(openai.BadRequestError) as refused:
            _create(project, file_id, {"type": "kto"})
        assert refused.value.param == "training_file", lines
        assert f"line {line}: {reason}" in refused.value.message, refused.value.message
        assert _create(project, file_id, {"type": "supervised"}).status == "validating_files"
    labelled = _upload(project, [{**chat, "label": True}, {**chat, "label": False}])
    for method in ("supervised", "kto"):
        assert _create(project, labelled, {"type": method}).status == "validating_files"
    with pytest.raises(openai.BadRequestError) as refused:  # the validation file is read the same way
        project.openai.fine_tuning.jobs.create(
            model=MODEL,
            training_file=labelled,
            validation_file=_upload(project, [chat]),
            method={"type": "kto"},  # type: ignore[arg-type]
        )
    assert refused.value.param == "validation_file" and "line 1: label is missing" in refused.value.message


def test_preference_method_jobs_are_accepted_on_their_formats(project: ProjectCtx) -> None:
    pairs, feedback = (
        _upload(project, [PAIR, PAIR]),
        _upload(project, [FEEDBACK, {**FEEDBACK, "label": False}]),
    )
    for method, file_id, hyperparameters in (
        ("orpo", pairs, {"beta": 0.2}),
        ("simpo", pairs, {"beta": 2.5, "gamma": 1.0}),
        ("kto", feedback, {"desirable_weight": 1.5}),
        ("reward_model", pairs, {}),
        ("dpo", pairs, {"loss_type": "ipo"}),
    ):
        job = _create(project, file_id, {"type": method, method: {"hyperparameters": hyperparameters}})
        section = job.model_dump()["method"][method]["hyperparameters"]
        assert {k: section[k] for k in hyperparameters} == hyperparameters, (method, section)
    with pytest.raises(openai.BadRequestError) as refused:
        _create(project, pairs, {"type": "kto"})
    assert refused.value.param == "training_file" and "kto" in refused.value.message
    with pytest.raises(openai.BadRequestError) as refused:
        _create(project, pairs, {"type": "dpo", "dpo": {"hyperparameters": {"loss_type": "nonsense"}}})
    assert refused.value.param is not None and "loss_type" in refused.value.param
