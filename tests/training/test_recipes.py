"""Every sensible method x adapter pair trains tiny-chat for real on CPU: the loss falls, the outputs
are where the worker expects them, and a saved adapter reloaded onto the base gives the trained
model's logits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.training.conftest import DATA, RecordingObserver, make_spec, read_metrics, train, train_losses
from tuneforge.models.spec import AdapterSpec
from tuneforge.training.loading import Device, load_model

CPU = Device(cuda=False, dtype_name="float32", attn_implementation="sdpa")

# Learning rates that move each adapter visibly within a dozen steps on tiny-chat.
SUPERVISED_LR = {
    "lora": 3e-3,
    "dora": 3e-3,
    "qlora": 3e-3,
    "ia3": 3e-2,
    "prefix_tuning": 3e-2,
    "prompt_tuning": 1e-1,
    "full": 1e-3,
}


def _reload(model_dir: Path, result: Any, adapter: AdapterSpec) -> Any:
    if adapter.type == "full":
        return AutoModelForCausalLM.from_pretrained(result.model_dir, dtype=torch.float32)
    from peft import PeftModel

    base = load_model(model_dir, CPU, adapter if adapter.type == "qlora" else None)
    return PeftModel.from_pretrained(base, result.adapter_dir)


@torch.no_grad()
def _logits(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    logits = model(input_ids=input_ids).logits.float()
    return logits[:, -input_ids.shape[1] :]  # prompt tuning may prepend its virtual tokens' positions


def _probe(model_dir: Path) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    messages = json.loads((DATA / "qa.jsonl").read_text().splitlines()[0])["messages"]
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    return torch.tensor([ids])


def _falls(losses: list[float]) -> bool:
    head, tail = losses[:3], losses[-3:]
    return sum(tail) / len(tail) < sum(head) / len(head)


@pytest.mark.slow
@pytest.mark.parametrize("adapter_type", list(SUPERVISED_LR))
def test_supervised_adapter_trains_and_reloads(
    adapter_type: str, tiny_chat_path: Path, tmp_path: Path
) -> None:
    adapter = AdapterSpec(type=adapter_type, num_virtual_tokens=8)  # type: ignore[arg-type]
    spec = make_spec(
        adapter=adapter.model_dump(),
        max_steps=12,
        batch_size=8,
        learning_rate=SUPERVISED_LR[adapter_type],
        lr_scheduler_type="constant",
    )
    observer = RecordingObserver()
    finished = train(spec, tiny_chat_path, DATA / "qa.jsonl", tmp_path / "run", observer)
    result = finished.result

    losses = train_losses(result.metrics_csv)  # type: ignore[arg-type]
    assert len(losses) == 12 and _falls(losses), losses
    assert result.stopped is None and result.final_step == 12 == result.total_steps
    assert observer.info is not None and observer.info.total_steps == 12
    assert observer.info.trainable_params == result.trainable_params > 0
    assert [m.step for m in observer.metrics] == list(range(1, 13))
    assert observer.metrics[-1].tokens_seen == result.trained_tokens > 0
    assert [c[0] for c in observer.checkpoints] == [3, 6, 9, 12]
    assert all(path.is_dir() for _, path, _ in observer.checkpoints)

    if adapter_type == "full":
        assert result.adapter_dir is None and result.model_dir is not None
        assert result.trainable_params == result.total_params
        assert (result.model_dir / "model.safetensors").is_file()
    else:
        assert result.adapter_dir is not None and result.model_dir is None
        config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == "tuneforge/tiny-chat"
        assert (result.adapter_dir / "adapter_model.safetensors").is_file()
        assert (result.adapter_dir / "tokenizer.json").is_file()
        card = (result.adapter_dir / "README.md").read_text()
        assert "tuneforge/tiny-chat" in card and adapter_type in card and "learning_rate" in card
        assert result.trainable_params < result.total_params
        # PEFT's own count, as print_trainable_parameters gives it.
        assert (result.trainable_params, result.total_params) == finished.model.get_nb_trainable_parameters()

    probe = _probe(tiny_chat_path)
    trained = _logits(finished.model, probe)
    reloaded = _logits(_reload(tiny_chat_path, result, adapter), probe)
    torch.testing.assert_close(reloaded, trained, rtol=1e-4, atol=1e-4)
    base = _logits(AutoModelForCausalLM.from_pretrained(tiny_chat_path), probe)
    assert not torch.allclose(base, trained, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("adapter_type", ["lora", "qlora", "full"])
def test_dpo_trains_and_reloads(adapter_type: str, tiny_chat_path: Path, tmp_path: Path) -> None:
    adapter = AdapterSpec(type=adapter_type)  # type: ignore[arg-type]
    spec = make_spec(
        "dpo",
        adapter=adapter.model_dump(),
        max_steps=8,
        batch_size=8,
        learning_rate=3e-3 if adapter_type != "full" else 1e-3,
        lr_scheduler_type="constant",
    )
    finished = train(spec, tiny_chat_path, DATA / "preferences.jsonl", tmp_path / "run")
    result = finished.result
    losses = train_losses(result.metrics_csv)  # type: ignore[arg-type]
    assert len(losses) == 8 and _falls(losses), losses
    assert losses[0] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1
    assert result.report["hyperparameters"]["beta"] == 0.1
    assert all(row["reward_margin"] for row in read_metrics(result.metrics_csv))  # type: ignore[arg-type]

    probe = _probe(tiny_chat_path)
    torch.testing.assert_close(
        _logits(_reload(tiny_chat_path, result, adapter), probe),
        _logits(finished.model, probe),
        rtol=1e-4,
        atol=1e-4,
    )


@pytest.mark.slow
@pytest.mark.parametrize("adapter_type", ["lora", "full"])
def test_pretraining_trains_packed(adapter_type: str, tiny_chat_path: Path, tmp_path: Path) -> None:
    adapter = AdapterSpec(type=adapter_type)  # type: ignore[arg-type]
    spec = make_spec(
        "pretraining",
        adapter=adapter.model_dump(),
        max_steps=8,
        batch_size=2,
        max_seq_length=64,
        learning_rate=3e-3 if adapter_type != "full" else 1e-3,
        lr_scheduler_type="constant",
    )
    finished = train(spec, tiny_chat_path, DATA / "corpus.jsonl", tmp_path / "run")
    result = finished.result
    losses = train_losses(result.metrics_csv)  # type: ignore[arg-type]
    assert len(losses) == 8 and _falls(losses), losses
    assert result.report["hyperparameters"]["packing"] is True
    # A 64-token row holds several texts: fewer rows than texts.
    assert result.report["data"]["train"]["examples"] == 12

    probe = _probe(tiny_chat_path)
    torch.testing.assert_close(
        _logits(_reload(tiny_chat_path, result, adapter), probe),
        _logits(finished.model, probe),
        rtol=1e-4,
        atol=1e-4,
    )


@pytest.mark.slow
def test_pretraining_continues_from_a_source_adapter(tiny_chat_path: Path, tmp_path: Path) -> None:
    """A pretraining job from an `ft:` model trains its parent's adapter, not a fresh one: its first
    loss starts where the parent's training left off."""
    from tuneforge.training.interface import RunPaths
    from tuneforge.training.run import run_recipe

    def spec(steps: int) -> Any:
        return make_spec(
            "pretraining",
            adapter={"type": "lora"},
            max_steps=steps,
            batch_size=2,
            max_seq_length=64,
            learning_rate=3e-3,
            lr_scheduler_type="constant",
        )

    parent = train(spec(8), tiny_chat_path, DATA / "corpus.jsonl", tmp_path / "parent").result
    parent_losses = train_losses(parent.metrics_csv)  # type: ignore[arg-type]
    paths = RunPaths(
        model_dir=tiny_chat_path,
        train_file=DATA / "corpus.jsonl",
        out_dir=tmp_path / "child",
        model_id="tuneforge/tiny-chat",
        source_adapter=parent.adapter_dir,
    )
    child = run_recipe(spec(1), paths).result
    child_first = train_losses(child.metrics_csv)[0]  # type: ignore[arg-type]
    assert child_first < parent_losses[0] - 0.5 * (parent_losses[0] - min(parent_losses)), (
        parent_losses,
        child_first,
    )
