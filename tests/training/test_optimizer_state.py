"""`continue.optimizer_state`: a run continued from a checkpoint with its state (RunPaths.source_state,
as the worker passes it for `{"continue": {"optimizer_state": true}}`) takes over the checkpoint's
Adam moments and step count and its scheduler's position; without it (the default) both start
fresh. Both continued runs start from the same adapter, data and seed, so their first gradients
are the same and the difference in their Adam moments after one step is the checkpoint's own,
decayed by one step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.training.conftest import DATA, RecordingObserver, make_spec
from tuneforge.models.spec import JobSpec
from tuneforge.training.common import Finished
from tuneforge.training.interface import RunPaths
from tuneforge.training.run import run_recipe

BETAS = (0.9, 0.999)  # the Trainer's AdamW defaults (adam_beta1, adam_beta2)


def _spec(steps: int, save: int) -> JobSpec:
    return make_spec(
        adapter={"type": "lora", "dropout": 0.0},
        max_steps=steps,
        save_every_steps=save,
        batch_size=8,
        learning_rate=3e-3,
        lr_scheduler_type="linear",
    )


def _run(tiny_chat_path: Path, out: Path, steps: int, save: int, **continued: Path | None) -> Finished:
    paths = RunPaths(
        model_dir=tiny_chat_path,
        train_file=DATA / "qa.jsonl",
        out_dir=out,
        model_id="tuneforge/tiny-chat",
        **continued,
    )
    return run_recipe(_spec(steps, save), paths, RecordingObserver())


def _state(checkpoint: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    optimizer = torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=True)
    scheduler = torch.load(checkpoint / "scheduler.pt", map_location="cpu", weights_only=True)
    return optimizer, scheduler


@pytest.mark.slow
def test_the_checkpoints_optimizer_and_scheduler_state_carry_over(
    tiny_chat_path: Path, tmp_path: Path
) -> None:
    _run(tiny_chat_path, tmp_path / "parent", steps=4, save=2)
    source = tmp_path / "parent" / "checkpoints" / "checkpoint-2"
    parent_optimizer, parent_scheduler = _state(source)
    assert parent_scheduler["last_epoch"] == 2
    assert {int(s["step"]) for s in parent_optimizer["state"].values()} == {2}

    resumed = _run(tiny_chat_path, tmp_path / "resumed", 1, 1, source_adapter=source, source_state=source)
    fresh = _run(tiny_chat_path, tmp_path / "fresh", 1, 1, source_adapter=source)
    assert resumed.result.metrics["train_loss"] == fresh.result.metrics["train_loss"]  # the same start

    resumed_optimizer, resumed_scheduler = _state(tmp_path / "resumed" / "checkpoints" / "checkpoint-1")
    fresh_optimizer, fresh_scheduler = _state(tmp_path / "fresh" / "checkpoints" / "checkpoint-1")
    # The schedule and Adam's step count go on from the checkpoint's (2 + 1), not from 0.
    assert (resumed_scheduler["last_epoch"], fresh_scheduler["last_epoch"]) == (3, 1)
    assert {int(s["step"]) for s in resumed_optimizer["state"].values()} == {3}
    assert {int(s["step"]) for s in fresh_optimizer["state"].values()} == {1}
    # m1 = b1 * m0 + (1 - b1) * g and v1 = b2 * v0 + (1 - b2) * g^2, with the same g in both runs:
    # the resumed run's m0, v0 are the checkpoint's, the fresh run's zero.
    assert parent_optimizer["state"].keys() == resumed_optimizer["state"].keys()
    for index, saved in parent_optimizer["state"].items():
        mine, theirs = resumed_optimizer["state"][index], fresh_optimizer["state"][index]
        assert saved["exp_avg"].abs().max() > 0
        torch.testing.assert_close(mine["exp_avg"] - theirs["exp_avg"], BETAS[0] * saved["exp_avg"])
        torch.testing.assert_close(mine["exp_avg_sq"] - theirs["exp_avg_sq"], BETAS[1] * saved["exp_avg_sq"])
