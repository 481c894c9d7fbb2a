"""Reinforcement fine-tuning through the openai SDK with the embedded worker (a real Celery worker
process): a job with a string_check grader succeeds with per-step reward, reward_std, kl and answer
length in its events and results CSV, eval_reward on the validation file every eval_interval steps,
and the reward in its checkpoints' metrics. A chat file (not prompts) is a 400 naming line 1; a file
whose line lacks a field the grader reads is a 400 at the grader's field naming that line (files
uploaded before uploads recorded their fields fail the worker's validation instead, as
tests/training/test_grpo.py checks). (That tiny-chat learns the task is test_grpo.py's, in-process.)"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import openai
import pytest
from openai import OpenAI

from .conftest import Stack
from .flows import wait_job

pytestmark = pytest.mark.slow

GRADER = {
    "type": "string_check",
    "name": "has the letter",
    "input": "{{sample.output_text}}",
    "reference": "{{item.letter}}",
    "operation": "like",
}
HYPERPARAMETERS: dict[str, Any] = {
    "batch_size": 2,
    "num_generations": 2,
    "max_new_tokens": 2,
    "max_steps": 4,
    "save_every_steps": 2,
    "eval_interval": 2,
    "eval_samples": 2,
    "beta": 0.01,
}


def _upload(client: OpenAI, lines: list[dict[str, Any]]) -> str:
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    return client.files.create(file=("rft.jsonl", data), purpose="fine-tune").id


def _create(client: OpenAI, training_file: str, validation_file: str | None = None) -> Any:
    return client.fine_tuning.jobs.create(
        model="tuneforge/tiny-chat",
        training_file=training_file,
        validation_file=validation_file,
        seed=3,
        method={
            "type": "reinforcement",
            "reinforcement": {"grader": GRADER, "hyperparameters": HYPERPARAMETERS},
        },  # type: ignore[typeddict-item]
    )


def test_an_rft_job_reports_rewards(embedded: Stack) -> None:
    client = OpenAI(base_url=embedded.base_url + "/v1", api_key=embedded.key, max_retries=0, timeout=300)
    prompts = [
        {"messages": [{"role": "user", "content": f"Say a word {i}."}], "letter": "e"} for i in range(4)
    ]
    training = _upload(client, prompts)

    chat = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "e"}]}]
    with pytest.raises(openai.BadRequestError) as refused:
        _create(client, _upload(client, chat))
    assert refused.value.param == "training_file" and "line 1" in refused.value.message

    with pytest.raises(openai.BadRequestError) as refused:
        _create(client, _upload(client, [prompts[0], {"messages": prompts[1]["messages"]}]))
    assert refused.value.param == "method.reinforcement.grader.reference"
    assert "line 2" in refused.value.message and "item.letter" in refused.value.message
    job = _create(client, training, validation_file=training)

    done = wait_job(client, job.id, timeout=600)
    assert done.status == "succeeded", (done.error, embedded.logs())
    events = client.fine_tuning.jobs.list_events(job.id, limit=1000).data
    steps = [e.data for e in events if e.type == "metrics" and e.data and "reward" in e.data]
    assert sorted(d["step"] for d in steps) == [1, 2, 3, 4]  # type: ignore[index]
    assert all({"reward_std", "kl", "completion_length"} <= set(d) for d in steps)  # type: ignore[arg-type]
    graded = [e.data for e in events if e.type == "metrics" and e.data and "eval_reward" in e.data]
    assert sorted(d["step"] for d in graded) == [2, 4]  # type: ignore[index]
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert sorted(c.step_number for c in checkpoints) == [2, 4]
    assert all("reward" in c.metrics.model_dump() for c in checkpoints)  # type: ignore[union-attr]
    rows = list(csv.DictReader(io.StringIO(client.files.content(done.result_files[0]).text)))
    assert [r["step"] for r in rows if r["reward"]] == ["1", "2", "3", "4"]
    assert all(r["kl"] and r["completion_length"] for r in rows if r["reward"])
