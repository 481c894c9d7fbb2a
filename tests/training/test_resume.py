"""Stop and resume: a stop request ends the run after the current step with a checkpoint, and a run
resumed from that checkpoint ends exactly where an unbroken run with the same seed ends."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.training.conftest import DATA, RecordingObserver, make_spec, read_metrics, train


def _spec():  # type: ignore[no-untyped-def]
    # Dropout on, so the restored RNG state matters; 2 epochs, so resuming crosses an epoch.
    return make_spec(adapter={"type": "lora", "dropout": 0.1}, max_steps=8, batch_size=8, learning_rate=3e-3)


@pytest.mark.slow
def test_stop_then_resume_matches_an_unbroken_run(tiny_chat_path: Path, tmp_path: Path) -> None:
    unbroken = train(_spec(), tiny_chat_path, DATA / "qa.jsonl", tmp_path / "unbroken").result

    stopper = RecordingObserver(stop_after=3, stop_reason="pause")
    stopped = train(_spec(), tiny_chat_path, DATA / "qa.jsonl", tmp_path / "broken", stopper).result
    assert stopped.stopped == "pause"
    assert stopped.final_step == 3 and stopped.total_steps == 8
    assert stopped.last_checkpoint == tmp_path / "broken" / "checkpoints" / "checkpoint-3"
    assert (stopped.last_checkpoint / "adapter_model.safetensors").is_file()
    assert (stopped.last_checkpoint / "optimizer.pt").is_file()
    assert stopper.checkpoints[-1][0] == 3
    assert stopped.adapter_dir is None  # a stopped run leaves checkpoints, not a final adapter

    observer = RecordingObserver()
    resumed = train(
        _spec(),
        tiny_chat_path,
        DATA / "qa.jsonl",
        tmp_path / "broken",
        observer,
        resume_from=stopped.last_checkpoint,
    ).result
    assert observer.info is not None and observer.info.start_step == 3
    assert [m.step for m in observer.metrics] == [4, 5, 6, 7, 8]
    assert resumed.stopped is None and resumed.final_step == 8
    assert resumed.metrics["train_loss"] == unbroken.metrics["train_loss"]
    assert resumed.trained_tokens == unbroken.trained_tokens

    # The metrics file covers the whole run, the same rows as the unbroken one's.
    assert read_metrics(resumed.metrics_csv) == read_metrics(unbroken.metrics_csv)  # type: ignore[arg-type]

    assert unbroken.adapter_dir is not None and resumed.adapter_dir is not None
    a = load_file(unbroken.adapter_dir / "adapter_model.safetensors")
    b = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0)


@pytest.mark.slow
def test_cancel_stops_after_the_current_step(tiny_chat_path: Path, tmp_path: Path) -> None:
    observer = RecordingObserver(stop_after=1, stop_reason="cancel")
    result = train(_spec(), tiny_chat_path, DATA / "qa.jsonl", tmp_path / "run", observer).result
    assert result.stopped == "cancel" and result.final_step == 1
    assert result.last_checkpoint is not None and result.last_checkpoint.name == "checkpoint-1"
    assert [row["step"] for row in read_metrics(result.metrics_csv)] == ["1"]  # type: ignore[arg-type]


@pytest.mark.slow
def test_seeded_runs_are_deterministic(tiny_chat_path: Path, tmp_path: Path) -> None:
    first = train(_spec(), tiny_chat_path, DATA / "qa.jsonl", tmp_path / "a").result
    again = train(_spec(), tiny_chat_path, DATA / "qa.jsonl", tmp_path / "b").result
    assert read_metrics(first.metrics_csv) == read_metrics(again.metrics_csv)  # type: ignore[arg-type]
    assert first.adapter_dir is not None and again.adapter_dir is not None
    assert (first.adapter_dir / "adapter_model.safetensors").read_bytes() == (
        again.adapter_dir / "adapter_model.safetensors"
    ).read_bytes()
