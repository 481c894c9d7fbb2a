"""Reinforcement fine-tuning (tuneforge/training/grpo.py) in-process: the data checks (a missing item
field, a line without a final user message) name the line, grader failures are counted and a step
whose every sample fails fails the run with a message that says so, QLoRA (4-bit on CPU) and IA3
adapters train, and an ft: model's adapter trains on against a frozen copy of itself (the memory
estimate's tests are tests/estimates/test_reinforcement.py). That tiny-chat learns a string_check
task, with the reward, its spread, the KL and the answers' length in events, the CSV and
checkpoints, is tests/e2e/test_rft.py's, through the SDK."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.training.conftest import RecordingObserver, train, write_jsonl
from tuneforge.graders import GraderRuntime
from tuneforge.graders.references import item_references
from tuneforge.models.spec import JobSpec
from tuneforge.training.data import DataError
from tuneforge.training.grpo import GraderFailed, GraderReward, read_prompt_file

GRADER = {
    "type": "string_check",
    "name": "has the letter",
    "input": "{{sample.output_text}}",
    "reference": "{{item.letter}}",
    "operation": "like",
}
PROMPTS = ["Write a word.", "Say something.", "Give me a word.", "Answer now.", "One word please.", "Speak."]


def _rft_lines() -> list[dict[str, Any]]:
    return [{"messages": [{"role": "user", "content": p}], "letter": "e"} for p in PROMPTS]


def _spec(adapter: str = "lora", grader: dict[str, Any] = GRADER, **hyperparameters: Any) -> JobSpec:
    hp = {
        "batch_size": 3,
        "num_generations": 4,
        "max_new_tokens": 2,
        "learning_rate": 2e-2,
        "beta": 0.01,
        "max_steps": 24,
        "save_every_steps": 12,
        **hyperparameters,
    }
    return JobSpec.model_validate(
        {
            "model": "tuneforge/tiny-chat",
            "training_file": "file-local",
            "seed": 11,
            "method": {"type": "reinforcement", "reinforcement": {"grader": grader, "hyperparameters": hp}},
            "adapter": {"type": adapter},
        }
    )


def test_data_checks_name_the_line(tiny_chat_path: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_path)
    lines = _rft_lines()
    lines[2] = {"messages": lines[2]["messages"], "other": 1}
    path = write_jsonl(tmp_path / "missing.jsonl", lines)
    with pytest.raises(DataError, match=r"line 3: the grader reads \{\{item.letter\}\} \(reference\)"):
        read_prompt_file(path, tokenizer, 64, grader=GRADER)
    answered = [
        {"messages": [*line["messages"], {"role": "assistant", "content": "e"}]} for line in _rft_lines()
    ]
    path = write_jsonl(tmp_path / "answered.jsonl", answered)
    with pytest.raises(DataError, match=r"line 1: .*not from the user"):
        read_prompt_file(path, tokenizer, 64, grader=GRADER)
    multi = item_references({"type": "multi", "graders": {"a": GRADER}})
    assert [(r.segments, r.param) for r in multi] == [(("letter",), "graders.a.reference")]


def test_grader_failures_count_and_a_step_of_failures_fails() -> None:
    reward = GraderReward({**GRADER, "reference": "{{item.missing}}"}, GraderRuntime())
    with pytest.raises(GraderFailed, match="every one of the step's 2 samples"):
        reward(
            prompts=[[], []],
            completions=[[{"content": "e"}], [{"content": "x"}]],
            tuneforge_item=['{"letter": "e"}'] * 2,
        )
    logged: dict[str, float] = {}
    reward = GraderReward(
        {"type": "multi", "name": "m", "graders": {"a": GRADER}, "calculate_output": "a"}, GraderRuntime()
    )
    items = ['{"letter": "e"}', '{"nope": 1}']
    got = reward(
        prompts=[[], []],
        completions=[[{"content": "e"}], [{"content": "e"}]],
        tuneforge_item=items,
        log_metric=logged.__setitem__,
    )
    assert got == [1.0, 0.0] and logged == {"grader_failures": 1.0} and reward.failures == 1


def test_a_grader_that_fails_on_every_sample_fails_the_run(tiny_chat_path: Path, tmp_path: Path) -> None:
    """The data check passes (the grader reads no item field a line lacks), but no sampled answer is
    JSON, so the grader fails on all 6 samples of the first step (3 prompts x 2 answers): the run
    stops there, naming the count, the first failure and what to check; the worker reports it as
    `training_error` with this text (tuneforge/worker/child.py)."""
    from tuneforge.worker.child import _error_code

    grader = {**GRADER, "input": "{{sample.output_json.answer}}"}
    train_file = write_jsonl(tmp_path / "rft.jsonl", _rft_lines())
    observer = RecordingObserver()
    with pytest.raises(GraderFailed) as failed:
        train(
            _spec(grader=grader, num_generations=2, max_steps=2),
            tiny_chat_path,
            train_file,
            tmp_path / "out",
            observer,
        )
    message = str(failed.value)
    assert message.startswith("the grader failed on every one of the step's 6 samples (first: "), message
    assert "sample_parse_error" in message or "invalid_variable_error" in message, message
    assert message.endswith("check its templates against the training file's fields")
    assert observer.metrics == [] and observer.checkpoints == []  # no step was taken
    assert _error_code(failed.value) == "training_error"


@pytest.mark.parametrize("adapter", ["qlora", "ia3"])
def test_rft_trains_qlora_and_ia3_adapters(adapter: str, tiny_chat_path: Path, tmp_path: Path) -> None:
    """A reinforcement run on a 4-bit (bitsandbytes NF4, on CPU) base with LoRA, and on IA3: steps
    log the grader's reward and its spread, and the adapter moves off its initial values. A fuzzy
    match against a sentence gives the sampled answers different rewards, so every step has a
    gradient (a string_check on random weights often rewards a whole group alike: no advantage)."""
    import bitsandbytes as bnb

    grader = {
        "type": "text_similarity",
        "name": "close",
        "input": "{{sample.output_text}}",
        "reference": "{{item.sentence}}",
        "evaluation_metric": "fuzzy_match",
    }
    lines = [{**line, "sentence": "the quick brown fox jumps"} for line in _rft_lines()]
    train_file = write_jsonl(tmp_path / "rft.jsonl", lines)
    spec = _spec(adapter, grader=grader, num_generations=4, max_new_tokens=6, max_steps=3, save_every_steps=3)
    observer = RecordingObserver()
    finished = train(spec, tiny_chat_path, train_file, tmp_path / "out", observer)
    assert finished.result.adapter_dir is not None and finished.result.final_step == 3
    steps = [m for m in observer.metrics if m.reward is not None]
    assert [m.step for m in steps] == [1, 2, 3]
    assert all(m.reward is not None and 0.0 <= m.reward <= 1.0 for m in steps)
    assert any(m.reward_std for m in steps), steps  # answers were told apart
    assert all(m.kl is not None and m.grader_failures == 0.0 for m in steps)
    modules = list(finished.model.modules())
    if adapter == "qlora":
        adapted = [m for m in modules if hasattr(m, "base_layer") and hasattr(m, "lora_A")]
        assert adapted and all(isinstance(m.base_layer, bnb.nn.Linear4bit) for m in adapted)
        assert all(m.base_layer.weight.quant_state.quant_type == "nf4" for m in adapted)
        assert any(m.lora_B["default"].weight.abs().sum() > 0 for m in adapted)  # B starts at 0
    else:
        vectors = [m.ia3_l["default"] for m in modules if hasattr(m, "ia3_l")]
        assert vectors and any((v - 1.0).abs().sum() > 0 for v in vectors)  # IA3 starts at 1


def test_rft_continues_from_a_fine_tuned_adapter(tiny_chat_path: Path, tmp_path: Path) -> None:
    """An ft: model's adapter (RunPaths.source_adapter, as the worker passes it) trains on, against
    a frozen copy of itself as the KL reference."""
    from tuneforge.training.interface import RunPaths
    from tuneforge.training.run import run_recipe

    train_file = write_jsonl(tmp_path / "rft.jsonl", _rft_lines())
    spec = _spec("dora", max_steps=2, save_every_steps=2)
    first = train(spec, tiny_chat_path, train_file, tmp_path / "first").result
    assert first.adapter_dir is not None
    observer = RecordingObserver()
    paths = RunPaths(
        model_dir=tiny_chat_path,
        train_file=train_file,
        out_dir=tmp_path / "second",
        model_id="tuneforge/tiny-chat",
        source_adapter=first.adapter_dir,
    )
    second = run_recipe(spec, paths, observer).result
    assert second.adapter_dir is not None and second.final_step == 2
    assert all(m.kl is not None for m in observer.metrics if m.reward is not None)
