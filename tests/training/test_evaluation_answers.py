"""An evaluation's greedy answers (`generate_answers`) are what the model's forward makes of each
prompt, token by token over the whole sequence, as training computes it: for prompt tuning and
prefix tuning adapters too (random weights, so that they answer differently from the base), whose
answers PEFT 0.21's `generate` gets wrong under transformers 5 (it adds the virtual tokens again at
every step). Prompts of different lengths share a left-padded batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.support.decoding import full_sequence_greedy
from tests.support.graders import EXACT
from tests.training.conftest import DATA, make_spec, train
from tuneforge.models.spec import EvaluationSpec
from tuneforge.training.evaluation import EvalItem, answers_path, generate_answers, read_answers

QUESTIONS = [
    "What is the capital of France?",
    "Hello there, who are you?",
    "Name a color.",
    "Please tell me, in a few words, which planet is the largest one in the solar system?",
]
MAX_NEW_TOKENS = 8


def _items() -> list[EvalItem]:
    return [EvalItem([{"role": "user", "content": q}], None, {}) for q in QUESTIONS]


@pytest.mark.parametrize("adapter_type", ["prompt_tuning", "prefix_tuning"])
def test_prompt_learning_answers_are_what_the_adapters_forward_computes(
    tiny_chat_path: Path, adapter_type: str
) -> None:
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_path)
    config = (
        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8)
        if adapter_type == "prompt_tuning"
        else PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6)
    )
    torch.manual_seed(3)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_chat_path), config)
    model.train()  # as the evaluation callback finds it; generate_answers switches to eval and back
    items = _items()

    answers = generate_answers(model, tokenizer, items, MAX_NEW_TOKENS)
    expected = [full_sequence_greedy(model, tokenizer, i.prompt, MAX_NEW_TOKENS).strip() for i in items]
    assert answers == expected
    assert model.training and tokenizer.padding_side == "right"

    # compare_base answers prompt-learning jobs' starting model with the adapter switched off
    with model.disable_adapter():
        base = generate_answers(model, tokenizer, items, MAX_NEW_TOKENS)
    plain = AutoModelForCausalLM.from_pretrained(tiny_chat_path)
    assert base == [full_sequence_greedy(plain, tokenizer, i.prompt, MAX_NEW_TOKENS).strip() for i in items]
    assert base != answers


@pytest.mark.slow
def test_a_prefix_tuning_jobs_evaluation_answers_as_its_model_computes(
    tiny_chat_path: Path, tmp_path: Path
) -> None:
    """Through the recipe's evaluation callback, on the model as the trainer holds it: the final
    answers are the trained adapter's, the base answers the base model's. After 10 steps tiny-chat's
    prompt-learning adapters put the end of the turn first (it ends every answer), so the adapter
    answers are empty; prefix tuning, because PEFT's `generate` already gets its first token wrong
    (it answered text), where with prompt tuning it goes wrong only from the second."""
    subset = tmp_path / "qa8.jsonl"
    subset.write_text("".join((DATA / "qa.jsonl").read_text().splitlines(keepends=True)[:8]))
    spec = make_spec(
        adapter={"type": "prefix_tuning", "num_virtual_tokens": 8},
        max_steps=10,
        batch_size=8,
        learning_rate=3e-2,
        lr_scheduler_type="constant",
    ).model_copy(
        update={
            "validation_file": "file-local",
            "evaluation": EvaluationSpec(grader=EXACT, max_new_tokens=12, compare_base=True),
        }
    )
    out = tmp_path / "run"
    finished = train(spec, tiny_chat_path, subset, out, valid_file=subset)
    assert finished.result.final_step == 10
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_path)
    rows = read_answers(answers_path(out, 10))
    prompts = [row["prompt"] for row in rows]
    assert len(prompts) == 8

    assert [row["answer"] for row in rows] == [
        full_sequence_greedy(finished.model, tokenizer, p, 12).strip() for p in prompts
    ]
    base = [row["answer"] for row in read_answers(answers_path(out, None))]
    plain = AutoModelForCausalLM.from_pretrained(tiny_chat_path)
    assert base == [full_sequence_greedy(plain, tokenizer, p, 12).strip() for p in prompts]
    assert [row["answer"] for row in rows] != base
