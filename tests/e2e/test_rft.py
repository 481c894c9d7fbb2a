"""Reinforcement fine-tuning through the openai SDK with the embedded worker (a real Celery worker
process): a job with a string_check grader succeeds with per-step reward, reward_std, kl, answer
length and grader failures in its events and results CSV, eval_reward on the validation file every
eval_interval steps (events and CSV), and reward, reward_std, kl, answer length and eval_reward in
its checkpoints' metrics. A chat file (not prompts) is a 400 naming line 1; a file
whose line lacks a field the grader reads is a 400 at the grader's field naming that line (files
uploaded before uploads recorded their fields fail the worker's validation instead, as
tests/training/test_grpo.py checks). On a task tiny-chat can get better at (put the letter the line
names into a two-token answer), a job's last quarter of steps is rewarded clearly above its first
quarter. A job from an `ft:` model (a short supervised LoRA job's) succeeds, shows its lineage, and
trains against that model as its KL reference."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import openai
import pytest
from openai import OpenAI

from .conftest import Stack
from .flows import metric_events, wait_job

pytestmark = pytest.mark.slow

BASE = "tuneforge/tiny-chat"
GRADER = {
    "type": "string_check",
    "name": "has the letter",
    "input": "{{sample.output_text}}",
    "reference": "{{item.letter}}",
    "operation": "like",
}
PROMPTS = ["Write a word.", "Say something.", "Give me a word.", "Answer now.", "One word please.", "Speak."]
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
# What tiny-chat learns the task with: full fine-tuning (on tiny-chat's random weights LoRA moves
# too little in a test's few steps), 4 answers to each of 3 prompts a step, 32 steps.
LEARN: dict[str, Any] = {
    "batch_size": 3,
    "num_generations": 4,
    "max_new_tokens": 2,
    "learning_rate": 3e-3,
    "beta": 0.01,
    "max_steps": 32,
    "save_every_steps": 16,
}


def _upload(client: OpenAI, lines: list[dict[str, Any]]) -> str:
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    return client.files.create(file=("rft.jsonl", data), purpose="fine-tune").id


def _create(
    client: OpenAI,
    training_file: str,
    validation_file: str | None = None,
    *,
    model: str = BASE,
    hyperparameters: dict[str, Any] = HYPERPARAMETERS,
    seed: int = 3,
    extra: dict[str, Any] | None = None,
) -> Any:
    # Tuneforge's hyperparameters are not in the SDK's typed dict; they travel as they are.
    method: Any = {
        "type": "reinforcement",
        "reinforcement": {"grader": GRADER, "hyperparameters": hyperparameters},
    }
    return client.fine_tuning.jobs.create(
        model=model,
        training_file=training_file,
        validation_file=validation_file,
        seed=seed,
        method=method,
        extra_body=extra,
    )


def _client(stack: Stack) -> OpenAI:
    return OpenAI(base_url=stack.base_url + "/v1", api_key=stack.key, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def prompts_file(embedded: Stack) -> str:
    """The task's prompts, uploaded once for every job of the module."""
    return _upload(
        _client(embedded), [{"messages": [{"role": "user", "content": p}], "letter": "e"} for p in PROMPTS]
    )


def test_an_rft_job_reports_rewards(embedded: Stack, prompts_file: str) -> None:
    client = _client(embedded)
    prompt = {"messages": [{"role": "user", "content": PROMPTS[0]}], "letter": "e"}

    chat = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "e"}]}]
    with pytest.raises(openai.BadRequestError) as refused:
        _create(client, _upload(client, chat))
    assert refused.value.param == "training_file" and "line 1" in refused.value.message

    with pytest.raises(openai.BadRequestError) as refused:
        _create(client, _upload(client, [prompt, {"messages": prompt["messages"]}]))
    assert refused.value.param == "method.reinforcement.grader.reference"
    assert "line 2" in refused.value.message and "item.letter" in refused.value.message
    job = _create(client, prompts_file, validation_file=prompts_file)

    done = wait_job(client, job.id, timeout=600)
    assert done.status == "succeeded", (done.error, embedded.logs())
    events = client.fine_tuning.jobs.list_events(job.id, limit=1000).data
    steps = [e.data for e in events if e.type == "metrics" and e.data and "reward" in e.data]
    assert sorted(d["step"] for d in steps) == [1, 2, 3, 4]  # type: ignore[index]
    assert all({"reward_std", "kl", "completion_length"} <= set(d) for d in steps)  # type: ignore[arg-type]
    # The grader reads a field every line has: each step counts its failures, none.
    assert [d.get("grader_failures") for d in steps] == [0.0] * 4  # type: ignore[union-attr]
    graded = [e.data for e in events if e.type == "metrics" and e.data and "eval_reward" in e.data]
    assert sorted(d["step"] for d in graded) == [2, 4]  # type: ignore[index]
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert sorted(c.step_number for c in checkpoints) == [2, 4]
    for checkpoint in checkpoints:
        kept = checkpoint.metrics.model_dump()  # type: ignore[union-attr]
        assert {"reward", "reward_std", "kl", "completion_length", "eval_reward"} <= set(kept), kept
        assert all(kept[name] is not None for name in ("reward", "reward_std", "kl", "eval_reward")), kept
    rows = list(csv.DictReader(io.StringIO(client.files.content(done.result_files[0]).text)))
    assert [r["step"] for r in rows if r["reward"]] == ["1", "2", "3", "4"]
    assert all(r["reward_std"] and r["kl"] and r["completion_length"] for r in rows if r["reward"])
    assert [r["grader_failures"] for r in rows if r["reward"]] == ["0.0"] * 4
    assert [r["step"] for r in rows if r["eval_reward"]] == ["2", "4"]
    assert all(0.0 <= float(r["eval_reward"]) <= 1.0 for r in rows if r["eval_reward"])


def test_an_rft_job_learns_a_string_check_task(embedded: Stack, prompts_file: str) -> None:
    client = _client(embedded)
    job = _create(client, prompts_file, hyperparameters=LEARN, seed=11, extra={"adapter": {"type": "full"}})
    done = wait_job(client, job.id, timeout=1800)
    assert done.status == "succeeded", (done.error, embedded.logs())
    rewards = [float(m["reward"]) for m in metric_events(client, job.id) if m.get("reward") is not None]
    assert len(rewards) == 32
    quarter = len(rewards) // 4
    first, last = sum(rewards[:quarter]) / quarter, sum(rewards[-quarter:]) / quarter
    # Measured (seed 11, as the recipe run in-process): 0.47 -> 0.68 on every run.
    assert last >= first + 0.15, (first, last, rewards)
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert sorted(c.step_number for c in checkpoints) == [16, 32]


def test_an_rft_job_continues_from_a_fine_tuned_model(embedded: Stack, prompts_file: str) -> None:
    """The source's adapter trains on against a frozen copy of itself: its first step's policy is
    the reference, so the KL starts at 0. Against the base (the adapter switched off) that first
    step's KL would be about 1.3 (measured on the supervised job's adapter and 2-token answers)."""
    client = _client(embedded)
    chat = [
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": "e"}]} for p in PROMPTS
    ]
    method: Any = {
        "type": "supervised",
        "supervised": {"hyperparameters": {"max_steps": 4, "batch_size": 3, "learning_rate": 3e-3}},
    }
    supervised = client.fine_tuning.jobs.create(
        model=BASE,
        training_file=_upload(client, chat),
        seed=5,
        method=method,
        extra_body={"adapter": {"type": "lora", "dropout": 0.0, "alpha": 64}},
    )
    source = wait_job(client, supervised.id, timeout=600)
    assert source.status == "succeeded" and source.fine_tuned_model, (source.error, embedded.logs())

    short = {"batch_size": 2, "num_generations": 2, "max_new_tokens": 2, "max_steps": 3, "beta": 0.01}
    job = _create(client, prompts_file, model=source.fine_tuned_model, hyperparameters=short)
    created: dict[str, Any] = client.fine_tuning.jobs.retrieve(job.id).to_dict()
    assert created["model"] == source.fine_tuned_model and created["base_model"] == BASE
    assert created["parent"] == {"job": supervised.id, "checkpoint": None}
    done = wait_job(client, job.id, timeout=600)
    assert done.status == "succeeded", (done.error, embedded.logs())
    assert done.fine_tuned_model and done.fine_tuned_model.startswith(f"ft:{BASE}:")
    steps = [m for m in metric_events(client, job.id) if m.get("reward") is not None]
    assert [m["step"] for m in steps] == [1, 2, 3]
    assert all("kl" in m for m in steps) and abs(steps[0]["kl"]) < 1e-3, steps  # measured: 0.0
