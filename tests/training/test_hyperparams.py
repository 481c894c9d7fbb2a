""" "auto" rules, the mapping onto TRL/transformers arguments, and the runs that use them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from trl import DPOConfig, SFTConfig

from tests.training.conftest import DATA, RecordingObserver, make_spec, read_metrics, train
from tuneforge.models.spec import DpoHyperparameters, Hyperparameters
from tuneforge.training.hyperparams import auto_batch_size, auto_epochs, resolve, trainer_arguments


def test_auto_rules() -> None:
    assert auto_epochs(10) == 10 and auto_epochs(32) == 4 and auto_epochs(2) == 25
    assert auto_epochs(1000) == 3 and auto_epochs(20_000) == 1
    assert auto_batch_size(3) == 3 and auto_batch_size(32) == 4 and auto_batch_size(10_000) == 16
    assert auto_batch_size(1_000_000) == 256


def test_resolve_reports_effective_values() -> None:
    hp = resolve(
        Hyperparameters(learning_rate_multiplier=2.0),
        method="supervised",
        adapter="lora",
        n_examples=32,
        packing=False,
        has_validation=False,
    )
    assert (hp.n_epochs, hp.batch_size, hp.learning_rate) == (4, 4, 4e-4)
    assert hp.save_every_steps == 8  # 4 epochs x 8 steps, a quarter
    dpo = resolve(
        DpoHyperparameters(learning_rate=1e-5),
        method="dpo",
        adapter="full",
        n_examples=100,
        packing=False,
        has_validation=True,
    )
    assert dpo.beta == 0.1 and dpo.learning_rate == 1e-5


def test_every_hyperparameter_maps_onto_trl_configs(tmp_path: Path) -> None:
    hp = resolve(
        DpoHyperparameters(
            n_epochs=2,
            batch_size=3,
            beta=0.3,
            max_steps=50,
            max_seq_length=256,
            gradient_accumulation_steps=2,
            warmup_ratio=0.1,
            lr_scheduler_type="cosine",
            weight_decay=0.01,
            eval_every_steps=5,
            save_every_steps=10,
            early_stopping_patience=2,
        ),
        method="dpo",
        adapter="lora",
        n_examples=100,
        packing=False,
        has_validation=True,
    )
    args = trainer_arguments(hp, has_validation=True)
    common = {"output_dir": str(tmp_path), "use_cpu": True, "bf16": False, "report_to": "none"}
    sft_args = {k: v for k, v in args.items() if k != "beta"}
    sft = SFTConfig(**common, **sft_args)
    assert (sft.num_train_epochs, sft.per_device_train_batch_size, sft.max_steps) == (2, 3, 50)
    assert (sft.max_length, sft.gradient_accumulation_steps, sft.weight_decay) == (256, 2, 0.01)
    assert sft.lr_scheduler_type == "cosine" and sft.warmup_steps == 0.1
    assert (sft.eval_strategy, sft.eval_steps, sft.save_steps) == ("steps", 5, 10)
    assert sft.metric_for_best_model == "eval_loss"
    dpo = DPOConfig(**common, **args)
    assert dpo.beta == 0.3 and dpo.max_length == 256


@pytest.mark.slow
def test_validation_file_and_explicit_packing(tiny_chat_path: Path, tmp_path: Path) -> None:
    spec = make_spec(max_steps=4, batch_size=8, eval_every_steps=3, packing=True, early_stopping_patience=3)
    observer = RecordingObserver()
    run_dir = tmp_path / "run"
    result = train(
        spec, tiny_chat_path, DATA / "qa.jsonl", run_dir, observer, valid_file=DATA / "qa.jsonl"
    ).result
    rows = read_metrics(result.metrics_csv)  # type: ignore[arg-type]
    # Every 3 steps, and the final weights (transformers evaluates at the last step too).
    assert [bool(r["valid_loss"]) for r in rows] == [False, False, True, True]
    assert rows[2]["valid_mean_token_accuracy"]
    assert result.metrics["full_valid_loss"] == float(rows[3]["valid_loss"]) == result.metrics["valid_loss"]
    assert result.metrics["full_valid_mean_token_accuracy"] == float(rows[3]["valid_mean_token_accuracy"])
    assert result.report["hyperparameters"]["packing"] is True
    assert result.report["hyperparameters"]["batching"] == "packing"
    assert result.report["data"]["validation"]["examples"] == 32
    assert any(m.valid_loss is not None for m in observer.metrics)


@pytest.mark.slow
def test_by_hand_entry_point(tiny_chat_path: Path, models_dir: Path, tmp_path: Path) -> None:
    spec = make_spec(max_steps=2, batch_size=4).model_dump(mode="json")
    spec["training_file"] = str(DATA / "qa.jsonl")
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    done = subprocess.run(
        [sys.executable, "-m", "tuneforge.training", str(spec_path), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)
    assert summary["final_step"] == 2 and summary["stopped"] is None
    assert Path(summary["adapter_dir"], "adapter_config.json").is_file()
    assert "step 2/2" in done.stderr
