"""Evaluations inside a job, through the openai SDK with the embedded worker (a real Celery worker
process): a job with `evaluation` on a learnable Q&A set grades its answers at each checkpoint and
at the end (`eval_score`), grades the base model once (`base_eval_score`), and writes the per-item
answers as `result_files[1]`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from tests.support.graders import EXACT

from .conftest import Stack
from .flows import wait_job

pytestmark = pytest.mark.slow

# 8 of the QA pairs, 50 steps: tiny-chat answers all 8 exactly after 50 steps (6 after 25) with
# seed 7; the base answers none (measured).
HYPERPARAMETERS: dict[str, Any] = {
    "n_epochs": 50,
    "batch_size": 8,
    "learning_rate": 2e-3,
    "lr_scheduler_type": "constant",
    "save_every_steps": 25,
    "eval_every_steps": 1000,
}


def test_a_job_with_evaluation_reports_scores_and_answers(
    embedded: Stack, qa_path: Path, tmp_path: Path
) -> None:
    # No retries: a create that outlasts the client's timeout on a busy machine must not be sent
    # twice (the second job would queue behind the first).
    client = OpenAI(base_url=embedded.base_url + "/v1", api_key=embedded.key, max_retries=0, timeout=300)
    subset = tmp_path / "qa8.jsonl"
    subset.write_text("".join(qa_path.read_text().splitlines(keepends=True)[:8]))
    with subset.open("rb") as handle:
        uploaded = client.files.create(file=("qa8.jsonl", handle), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="tuneforge/tiny-chat",
        training_file=uploaded.id,
        validation_file=uploaded.id,
        seed=7,
        method={"type": "supervised", "supervised": {"hyperparameters": HYPERPARAMETERS}},  # type: ignore[typeddict-item]
        extra_body={
            "adapter": {"type": "lora", "dropout": 0.0, "alpha": 64},
            "evaluation": {"grader": EXACT, "max_new_tokens": 8, "compare_base": True},
        },
    )
    done = wait_job(client, job.id, timeout=800)
    assert done.status == "succeeded", (done.error, embedded.logs())

    checkpoints = sorted(client.fine_tuning.jobs.checkpoints.list(job.id).data, key=lambda c: c.step_number)
    assert [c.step_number for c in checkpoints] == [25, 50]
    scores = [c.metrics.model_dump()["eval_score"] for c in checkpoints]  # type: ignore[union-attr]
    assert scores[-1] >= 0.9, scores

    events = client.fine_tuning.jobs.list_events(job.id, limit=1000).data
    graded = [e.data for e in events if e.type == "metrics" and e.data and "eval_score" in e.data]
    assert sorted(d["step"] for d in graded) == [25, 50]  # type: ignore[index]
    final = next(e for e in events if e.message.startswith("New fine-tuned model created"))
    metrics = final.data["metrics"]  # type: ignore[index]
    assert metrics["eval_score"] >= 0.9 and metrics["base_eval_score"] <= 0.1, metrics

    assert len(done.result_files) == 2
    assert client.files.retrieve(done.result_files[1]).purpose == "fine-tune-results"
    rows = [json.loads(line) for line in client.files.content(done.result_files[1]).text.splitlines()]
    assert len(rows) == 8
    assert rows[0]["reference"] == "Paris." and rows[0]["prompt"][-1]["content"].endswith("France?")
    assert sum(r["fine_tuned_answer"] == r["reference"] for r in rows) >= 7
    assert all(r["fine_tuned_score"] == float(r["fine_tuned_answer"] == r["reference"]) for r in rows)
    assert all(r["base_answer"] != r["reference"] and r["base_score"] == 0.0 for r in rows), rows
