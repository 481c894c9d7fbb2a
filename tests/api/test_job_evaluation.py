"""The create-job extension `evaluation` through the openai SDK: stored and echoed in the spec, a
bad grader is a 400 whose `param` points into `evaluation.grader`, it needs a validation file, and
a grader the service cannot run (python graders off, no grader model) is a 400 naming its type."""

from __future__ import annotations

from typing import Any

import openai
import pytest
from fastapi import FastAPI

from tests.api.conftest import ProjectCtx
from tests.support.graders import EXACT
from tuneforge.config import Settings
from tuneforge.db import session_scope
from tuneforge.models import job as jobs

PYTHON = {"type": "python", "name": "p", "source": "def grade(sample, item):\n    return 1.0\n"}


def create(project: ProjectCtx, file_id: str, evaluation: Any, validation: bool = True) -> Any:
    return project.openai.fine_tuning.jobs.create(
        model="tuneforge/tiny-chat",
        training_file=file_id,
        validation_file=file_id if validation else None,  # type: ignore[arg-type]
        extra_body={"evaluation": evaluation},
    )


def test_evaluation_is_stored_with_its_defaults(project: ProjectCtx, chat_jsonl: str, app: FastAPI) -> None:
    file_id = project.upload(chat_jsonl)
    job = create(project, file_id, {"grader": EXACT, "max_new_tokens": 16})
    with session_scope(app.state.sessionmaker) as session:
        row = session.get(jobs.Job, job.id)
        assert row is not None
        assert row.spec["evaluation"] == {
            "grader": EXACT,
            "max_samples": 50,
            "max_new_tokens": 16,
            "compare_base": True,
        }


@pytest.mark.parametrize(
    ("evaluation", "validation", "param"),
    [
        ({"grader": {**EXACT, "operation": "equals"}}, True, "evaluation.grader.operation"),
        ({"grader": {**EXACT, "reference": "{{answer}}"}}, True, "evaluation.grader.reference"),
        ({"grader": {"type": "nope"}}, True, "evaluation.grader.type"),
        ({"grader": EXACT, "max_samples": 0}, True, "evaluation.max_samples"),
        ({"grader": EXACT, "extra": 1}, True, "evaluation.extra"),
        ({"grader": EXACT}, False, "validation_file"),
        ({"grader": PYTHON}, True, "evaluation.grader.type"),  # python graders are off here
    ],
)
def test_a_bad_evaluation_is_a_400_naming_the_field(
    project: ProjectCtx, chat_jsonl: str, evaluation: Any, validation: bool, param: str
) -> None:
    file_id = project.upload(chat_jsonl)
    with pytest.raises(openai.BadRequestError) as refused:
        create(project, file_id, evaluation, validation)
    assert refused.value.status_code == 400
    assert refused.value.param == param, refused.value.message  # type: ignore[attr-defined]


def test_a_python_grader_evaluation_is_taken_once_enabled(
    project: ProjectCtx, chat_jsonl: str, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(settings, "python_grader_enabled", True)
    file_id = project.upload(chat_jsonl)
    assert create(project, file_id, {"grader": PYTHON}).status == "validating_files"
