"""Issue 9's preference and reward methods, the parts that need no training: the KTO reader's
label checks, DPO's loss_type and the methods' estimates. That ORPO, SimPO, KTO and reward models
learn (held-out margins, reward ranking) is tested once, through the SDK on a real worker:
tests/e2e/test_preference_methods.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.training.conftest import make_spec, write_jsonl
from tuneforge.training.formats import inspect_lines


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
