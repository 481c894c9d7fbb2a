"""A continued job's `compare_base` grades the model it starts from, not the raw base: README's
walk-through (SFT with an evaluation, then DPO from the SFT model on the same items as preference
pairs) reads the DPO job's `base_eval_score` as the SFT model's score. Here, in-process: the DPO
run's starting answers are the SFT run's final answers, item for item, and not the raw base's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.graders import EXACT
from tests.training.conftest import DATA, make_spec
from tuneforge.models.spec import EvaluationSpec, JobSpec
from tuneforge.training.evaluation import answers_path, read_answers
from tuneforge.training.interface import RunPaths
from tuneforge.training.run import run_recipe

EVALUATION = EvaluationSpec(grader=EXACT, max_new_tokens=12, compare_base=True)
ADAPTER = {"type": "lora", "dropout": 0.0, "alpha": 64}  # the API gives the DPO job its source's


def _evaluated(spec: JobSpec) -> JobSpec:
    return spec.model_copy(update={"validation_file": "file-local", "evaluation": EVALUATION})


def _answers(out: Path, step: int | None) -> list[tuple[object, object, str]]:
    return [(r["prompt"], r["reference"], r["answer"]) for r in read_answers(answers_path(out, step))]


@pytest.mark.slow
def test_a_continued_jobs_base_answers_are_its_source_models(tiny_chat_path: Path, tmp_path: Path) -> None:
    qa = tmp_path / "qa8.jsonl"
    qa.write_text("".join((DATA / "qa.jsonl").read_text().splitlines(keepends=True)[:8]))
    sft = _evaluated(
        make_spec(
            adapter=ADAPTER,
            max_steps=10,
            save_every_steps=10,
            batch_size=8,
            learning_rate=3e-3,
            lr_scheduler_type="constant",
        )
    )
    sft_paths = RunPaths(tiny_chat_path, qa, tmp_path / "sft", valid_file=qa, model_id="tuneforge/tiny-chat")
    sft_run = run_recipe(sft, sft_paths).result
    assert sft_run.adapter_dir is not None

    # The walk-through's step 3: the evaluated items as preference pairs, for training and validation.
    pairs = tmp_path / "pairs.jsonl"
    with pairs.open("w") as handle:
        for line in qa.read_text().splitlines():
            messages = json.loads(line)["messages"]
            handle.write(
                json.dumps(
                    {
                        "input": {"messages": messages[:-1]},
                        "preferred_output": [messages[-1]],
                        "non_preferred_output": [{"role": "assistant", "content": "No."}],
                    }
                )
                + "\n"
            )
    dpo = _evaluated(make_spec("dpo", adapter=ADAPTER, max_steps=1, batch_size=8, learning_rate=1e-5))
    dpo_paths = RunPaths(
        tiny_chat_path,
        pairs,
        tmp_path / "dpo",
        valid_file=pairs,
        model_id="tuneforge/tiny-chat",
        source_adapter=sft_run.adapter_dir,
    )
    run_recipe(dpo, dpo_paths)

    sft_final, raw_base = _answers(tmp_path / "sft", 10), _answers(tmp_path / "sft", None)
    assert _answers(tmp_path / "dpo", None) == sft_final  # same prompts, references and answers
    assert [a for *_, a in sft_final] != [a for *_, a in raw_base]
