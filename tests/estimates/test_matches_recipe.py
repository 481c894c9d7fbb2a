"""An estimate's counts are the ones a real job reports: one-step runs of the training recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneforge.estimates import EstimateRequest, estimate
from tuneforge.models.spec import JobSpec
from tuneforge.training.interface import RunPaths
from tuneforge.training.run import run_training


@pytest.mark.slow
@pytest.mark.parametrize("adapter", [{"type": "qlora"}, {"type": "ia3"}, {"type": "prefix_tuning"}], ids=str)
def test_counts_equal_the_recipes(
    tiny_chat_path: Path, qa_path: Path, tmp_path: Path, adapter: dict[str, str]
) -> None:
    hyperparameters = {"max_steps": 1, "batch_size": 2, "max_seq_length": 64}
    spec = JobSpec.model_validate(
        {
            "model": "tuneforge/tiny-chat",
            "training_file": "file-qa",
            "seed": 0,
            "adapter": adapter,
            "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
        }
    )
    result = run_training(
        spec, RunPaths(model_dir=tiny_chat_path, train_file=qa_path, out_dir=tmp_path / "out")
    )
    config = (tiny_chat_path / "config.json").read_text()
    predicted = estimate(
        EstimateRequest.model_validate({"model_config": json.loads(config), "adapter": adapter})
    )
    assert (predicted.trainable_params, predicted.total_params) == (
        result.trainable_params,
        result.total_params,
    )
