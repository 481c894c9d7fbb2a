"""QLoRA on CPU: 4-bit bitsandbytes base layers, a training adapter and a merged export that loads
and generates. Packing: padding-free packed rows give the same logits as separate sequences (SDPA)."""

from __future__ import annotations

from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from tests.training.conftest import DATA, greedy_answers, make_spec, qa_pairs, train, train_losses
from tuneforge.training.loading import Device, choose_packing


@pytest.mark.slow
def test_qlora_trains_4bit_and_exports_a_merged_model(tiny_chat_path: Path, tmp_path: Path) -> None:
    spec = make_spec(
        adapter={"type": "qlora", "quant_type": "nf4", "double_quant": True},
        export=["merged"],
        max_steps=8,
        batch_size=8,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
    )
    finished = train(spec, tiny_chat_path, DATA / "qa.jsonl", tmp_path / "run")
    result = finished.result

    adapted = [m for m in finished.model.modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A")]
    assert len(adapted) == 4 * 7  # q, k, v, o, gate, up, down in each of the 4 layers
    assert all(isinstance(m.base_layer, bnb.nn.Linear4bit) for m in adapted)
    assert all(m.base_layer.weight.quant_state.quant_type == "nf4" for m in adapted)
    losses = train_losses(result.metrics_csv)  # type: ignore[arg-type]
    assert sum(losses[-3:]) < sum(losses[:3])
    assert all(m.lora_B["default"].weight.abs().sum() > 0 for m in adapted)

    assert result.merged_dir is not None
    merged = AutoModelForCausalLM.from_pretrained(result.merged_dir, dtype=torch.float32)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    assert str(tiny_chat_path) not in (result.merged_dir / "config.json").read_text()
    tokenizer = AutoTokenizer.from_pretrained(result.merged_dir)
    prompts = [p for p, _ in qa_pairs()[:4]]
    assert all(isinstance(a, str) for a in greedy_answers(merged, tokenizer, prompts))
    batch = tokenizer.apply_chat_template(
        prompts[0], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    generated = merged.generate(**batch, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert generated.shape[1] == batch["input_ids"].shape[1] + 5


def test_packing_choice_follows_device_and_request() -> None:
    cpu = Device(cuda=False, dtype_name="float32", attn_implementation="sdpa")
    flash = Device(cuda=True, dtype_name="bfloat16", attn_implementation="flash_attention_2")
    sdpa_gpu = Device(cuda=True, dtype_name="bfloat16", attn_implementation="sdpa")
    assert choose_packing(None, "supervised", cpu) is False
    assert choose_packing(None, "supervised", sdpa_gpu) is False
    assert choose_packing(None, "supervised", flash) is True
    assert choose_packing(True, "supervised", cpu) is True
    assert choose_packing(False, "supervised", flash) is False
    assert choose_packing(None, "pretraining", cpu) is True
    assert choose_packing(True, "dpo", flash) is False


@torch.no_grad()
def test_packed_rows_give_the_logits_of_separate_sequences(tiny_chat_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_path, attn_implementation="sdpa").eval()
    texts = ["Paris is the capital of France.", "Two plus three is five, and ten minus four is six.", "Ice."]
    examples = [{"input_ids": tokenizer(t)["input_ids"]} for t in texts]

    collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)
    packed = collator(examples)
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] == 1
    # As SFTTrainer.compute_loss calls it: no attention mask, no cache, the packed position_ids.
    packed_logits = model(
        input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False
    ).logits[0]

    start = 0
    for example in examples:
        ids = torch.tensor([example["input_ids"]])
        alone = model(input_ids=ids).logits[0]
        torch.testing.assert_close(packed_logits[start : start + ids.shape[1]], alone, rtol=1e-4, atol=1e-4)
        start += ids.shape[1]

    # Without the position_ids the rows would attend across examples: the check has teeth.
    leaky = model(input_ids=packed["input_ids"], use_cache=False).logits[0]
    second = len(examples[0]["input_ids"])
    assert not torch.allclose(leaky[second : second + 3], packed_logits[second : second + 3], atol=1e-4)
