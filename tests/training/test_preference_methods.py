"""Issue 9's preference and reward methods train tiny-chat for real: ORPO, SimPO and KTO raise the
chosen-vs-rejected margin over the base on held-out pairs (prompts never trained on), and a reward
model ranks the held-out chosen answer above the rejected one on most pairs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from tests.training.conftest import make_spec, train, write_jsonl
from tests.training.test_learning import _mean_margin
from tuneforge.training.data import read_training_file
from tuneforge.training.formats import inspect_lines

THINGS = [
    "apples", "rivers", "stars", "clocks", "horses", "bridges", "candles", "forests",
    "mirrors", "rockets", "gardens", "pianos", "islands", "lamps", "oceans", "towers",
    "wolves", "books", "clouds", "ships", "stones", "trains", "flowers", "kites",
    "dragons", "engines", "spoons", "rabbits", "violins", "tables", "comets", "maps",
]  # fmt: skip
TRAIN, HELD_OUT = THINGS[:24], THINGS[24:]


def _pair(thing: str) -> dict[str, Any]:
    """A preference the model can generalise: a helpful sentence about the thing over a refusal."""
    return {
        "input": {"messages": [{"role": "user", "content": f"Tell me about {thing}."}]},
        "preferred_output": [{"role": "assistant", "content": f"Here is a fact about {thing}."}],
        "non_preferred_output": [{"role": "assistant", "content": "No. Go away."}],
    }


def _feedback(thing: str) -> list[dict[str, Any]]:
    pair = _pair(thing)
    prompt = pair["input"]["messages"]
    return [
        {"messages": prompt + pair["preferred_output"], "label": True},
        {"messages": prompt + pair["non_preferred_output"], "label": False},
    ]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("preference")
    return {
        "pairs": write_jsonl(root / "pairs.jsonl", [_pair(t) for t in TRAIN]),
        "feedback": write_jsonl(root / "feedback.jsonl", [r for t in TRAIN for r in _feedback(t)]),
        "held_out": write_jsonl(root / "held_out.jsonl", [_pair(t) for t in HELD_OUT]),
    }


@pytest.fixture(scope="module")
def held_out(tiny_chat_path: Path, data: dict[str, Path]) -> tuple[Any, list[dict[str, Any]], float]:
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_path)
    pairs = read_training_file(data["held_out"], "dpo", tokenizer, 1024).rows
    base = _mean_margin(AutoModelForCausalLM.from_pretrained(tiny_chat_path), tokenizer, pairs)
    return tokenizer, pairs, base


@pytest.mark.parametrize(
    ("method", "file", "knobs"),
    [
        ("orpo", "pairs", {"beta": 0.5}),
        ("simpo", "pairs", {"beta": 2.0, "gamma": 0.5}),
        ("kto", "feedback", {"beta": 0.1}),
    ],
)
def test_method_raises_the_held_out_margin(
    method: str,
    file: str,
    knobs: dict[str, Any],
    tiny_chat_path: Path,
    data: dict[str, Path],
    held_out: tuple[Any, list[dict[str, Any]], float],
    tmp_path: Path,
) -> None:
    tokenizer, pairs, base_margin = held_out
    spec = make_spec(
        method, max_steps=12, batch_size=8, learning_rate=3e-3, lr_scheduler_type="constant", **knobs
    )
    finished = train(spec, tiny_chat_path, data[file], tmp_path / "run")
    assert finished.result.final_step == 12
    assert finished.result.report["method"] == method
    assert finished.result.report["hyperparameters"]["beta"] == knobs["beta"]
    assert finished.result.adapter_dir is not None
    assert (finished.result.adapter_dir / "adapter_model.safetensors").is_file()
    trained_margin = _mean_margin(finished.model, tokenizer, pairs)
    # Measured (seed 7): base -41.3; orpo 10.4, simpo 4.6, kto 18.9 after 12 steps.
    assert trained_margin > base_margin + 20, (method, base_margin, trained_margin)


def test_reward_model_ranks_held_out_pairs(
    tiny_chat_path: Path, data: dict[str, Path], tmp_path: Path
) -> None:
    from peft import PeftModel

    from tuneforge.training.reward import score

    spec = make_spec("reward_model", max_steps=12, batch_size=8, learning_rate=3e-3)
    finished = train(spec, tiny_chat_path, data["pairs"], tmp_path / "run")
    adapter_dir = finished.result.adapter_dir
    assert adapter_dir is not None

    # The artifact alone, as a user loads it: the base as a one-label classifier plus the adapter.
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    base = AutoModelForSequenceClassification.from_pretrained(
        tiny_chat_path, num_labels=1, pad_token_id=tokenizer.pad_token_id
    )
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    pairs = read_training_file(data["held_out"], "dpo", tokenizer, 1024).rows
    right = sum(
        score(model, tokenizer, p["prompt"], p["chosen"])
        > score(model, tokenizer, p["prompt"], p["rejected"])
        for p in pairs
    )
    assert right >= 7, f"{right} of {len(pairs)} held-out pairs ranked chosen above rejected"


def test_kto_line_without_label_is_named(tmp_path: Path) -> None:
    """Only a kto job reads `label`: its reader names the first line without a boolean one, and a
    supervised job reads the same lines as prompt/completion data with an extra key."""
    from tuneforge.training.data import DataError, read_records

    good = {"prompt": "Hi", "completion": "Hello.", "label": True}
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [good, {"prompt": "Hi", "completion": "Go."}])
    with pytest.raises(DataError, match="line 2: label is missing"):
        read_records(mixed, "kto")
    assert read_records(mixed, "supervised")[0].value == "prompt_completion"
    odd = write_jsonl(tmp_path / "odd.jsonl", [{**good, "label": "yes"}])
    with pytest.raises(DataError, match="line 1: label must be true"):
        read_records(odd, "kto")
    unlabelled = write_jsonl(tmp_path / "unlabelled.jsonl", [{"prompt": "Hi", "completion": "Go."}])
    with pytest.raises(DataError, match="line 1: label is missing"):
        read_records(unlabelled, "kto")
    assert inspect_lines([json.dumps(good)]).format.value == "kto"
    assert (
        read_records(write_jsonl(tmp_path / "good.jsonl", [good]), "supervised")[0].value
        == "prompt_completion"
    )


def test_dpo_loss_type_reaches_the_recipe(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from tuneforge.training.dpo import DpoConfig
    from tuneforge.training.interface import RunPaths
    from tuneforge.training.run import recipe_config

    paths = RunPaths(model_dir=tmp_path, train_file=tmp_path / "t.jsonl", out_dir=tmp_path / "out")
    for spec, expected in ((make_spec("dpo"), "sigmoid"), (make_spec("dpo", loss_type="ipo"), "ipo")):
        cfg = recipe_config(spec, paths)
        assert isinstance(cfg, DpoConfig) and cfg.loss_type == expected
    with pytest.raises(ValidationError, match="loss_type"):
        make_spec("dpo", loss_type="nonsense")
    with pytest.raises(ValidationError, match="gamma"):
        make_spec("orpo", gamma=0.5)  # SimPO's knob, not ORPO's


def test_estimates_and_advice_per_method() -> None:
    from tests.support.model_configs import LLAMA_31_8B
    from tuneforge.estimates import EstimateRequest, estimate

    def run(method: str, adapter: str = "lora", **body: Any) -> Any:
        request = {"model_config": LLAMA_31_8B, "method": method, "adapter": {"type": adapter}}
        return estimate(EstimateRequest.model_validate({**request, **body}))

    sft, orpo, kto = run("supervised"), run("orpo"), run("kto")
    assert orpo.memory.activations == 2 * sft.memory.activations  # chosen + rejected in one batch
    assert kto.memory.activations == sft.memory.activations and kto.memory.weights == sft.memory.weights
    full_sft, full_kto, full_simpo = run("supervised", "full"), run("kto", "full"), run("simpo", "full")
    assert full_kto.memory.weights - full_sft.memory.weights == full_sft.total_params * 2  # bf16 reference
    assert full_simpo.memory.weights == full_sft.memory.weights  # no reference model
    assert orpo.recommendation.stages == ["orpo"]
    assert run("simpo").recommendation.stages == ["supervised", "simpo"]
    assert run("reward_model").recommendation.stages == ["reward_model"]
    assert run("supervised", data_format="kto_chat").recommendation.stages == ["supervised", "kto"]
