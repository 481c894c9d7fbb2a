"""A run whose loss or gradients stop being finite fails with NonFiniteLoss (the worker reports
`non_finite_loss`) instead of "succeeding" with a loss of 0.0."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.training.conftest import DATA, RecordingObserver, make_spec, train
from tuneforge.training.callbacks import NonFiniteLoss, check_finite
from tuneforge.worker.child import _error_code


@pytest.mark.slow
def test_a_diverging_run_fails_at_its_first_non_finite_step(tiny_chat_path: Path, tmp_path: Path) -> None:
    spec = make_spec(adapter={"type": "lora"}, max_steps=4, batch_size=4)
    # alpha 1e308: the API refuses it now, but a recipe run by hand (or any overflow) can get
    # here; the tiny model then logs loss 0.0 with a NaN gradient norm.
    spec = spec.model_copy(update={"adapter": spec.adapter.model_copy(update={"alpha": 1e308})})
    observer = RecordingObserver()
    with pytest.raises(NonFiniteLoss, match=r"training diverged at step 1 \(.*grad_norm=nan"):
        train(spec, tiny_chat_path, DATA / "qa.jsonl", tmp_path / "run", observer)
    assert observer.metrics == []  # no step with a meaningless loss is reported
    assert not (tmp_path / "run" / "adapter").exists()


def test_check_finite() -> None:
    check_finite(3, {"loss": 1.5, "grad_norm": 0.2, "learning_rate": 1e-4})
    check_finite(3, {"eval_loss": 1.0})
    for logs in ({"loss": float("nan")}, {"loss": 0.0, "grad_norm": float("inf")}):
        with pytest.raises(NonFiniteLoss, match="step 3"):
            check_finite(3, logs)


def test_the_worker_names_it_non_finite_loss() -> None:
    assert _error_code(NonFiniteLoss("training diverged at step 1")) == "non_finite_loss"
    assert _error_code(RuntimeError("something else")) == "training_error"
