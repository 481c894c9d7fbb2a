"""Job-create values outside what training can use are 400s naming the field, not 500s or jobs
that train on nonsense: non-finite or huge LoRA alpha, step counts past int32, over-long ids."""

from __future__ import annotations

import pytest

from tests.api.conftest import ProjectCtx

MODEL = "tuneforge/tiny-chat"


@pytest.mark.parametrize(
    ("fragment", "param"),
    [
        ('"adapter": {"alpha": Infinity}', "adapter.alpha"),
        ('"adapter": {"alpha": -Infinity}', "adapter.alpha"),
        ('"adapter": {"alpha": NaN}', "adapter.alpha"),
        ('"adapter": {"alpha": 1e308}', "adapter.alpha"),
        ('"adapter": {"target_modules": ["' + "q" * 300 + '"]}', "adapter.target_modules[0]"),
        (
            '"method": {"type": "supervised", "supervised": {"hyperparameters": {"max_steps": 1e400}}}',
            "method.supervised.hyperparameters.max_steps",
        ),
        (
            '"method": {"type": "supervised", "supervised": {"hyperparameters": {"save_every_steps": '
            + str(2**63)
            + "}}}",
            "method.supervised.hyperparameters.save_every_steps",
        ),
        ('"validation_file": "file-' + "x" * 100 + '"', "validation_file"),
    ],
)
def test_out_of_range_values_are_400s(
    project: ProjectCtx, chat_jsonl: str, fragment: str, param: str
) -> None:
    file_id = project.upload(chat_jsonl)
    raw = f'{{"model": "{MODEL}", "training_file": "{file_id}", {fragment}}}'
    response = project.client.post(
        "/v1/fine_tuning/jobs", content=raw, headers={**project.headers, "content-type": "application/json"}
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_a_large_finite_alpha_is_still_accepted(project: ProjectCtx, chat_jsonl: str) -> None:
    job = project.openai.fine_tuning.jobs.create(
        model=MODEL, training_file=project.upload(chat_jsonl), extra_body={"adapter": {"r": 8, "alpha": 4096}}
    )
    assert job.model_dump()["adapter"]["alpha"] == 4096
