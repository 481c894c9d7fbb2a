"""A tracking integration that fails mid-run (tuneforge/training/integrations.py): a real tiny-chat
run logs to MLflow (a local SQLite store, as TUNEFORGE_MLFLOW_TRACKING_URI names it) and to
TensorBoard; after step 1 its MLflow run is deleted behind its back, so the tracker's next
`log_batch` raises. The run goes on and succeeds; the failure reaches the observer once, as the
notice the worker writes as a warning event; TensorBoard logs every step all the same."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.training.conftest import DATA, RecordingObserver, train
from tuneforge.config import get_settings
from tuneforge.models.spec import JobSpec
from tuneforge.training.interface import StepMetrics

STEPS = 3


@dataclass
class SabotagingObserver(RecordingObserver):
    """Records the run's notices; when step 2's metrics come (before the trackers log them),
    deletes the MLflow run the tracker writes to."""

    tracking_uri: str = ""
    notices: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def on_notice(self, message: str, data: dict[str, Any]) -> None:
        self.notices.append((message, data))

    def on_metrics(self, metrics: StepMetrics) -> None:
        super().on_metrics(metrics)
        if metrics.step == 2:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=self.tracking_uri)
            experiment = client.get_experiment_by_name("mid-run")
            assert experiment is not None
            (run,) = client.search_runs([experiment.experiment_id])
            client.delete_run(run.info.run_id)


@pytest.fixture
def mlflow_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).create_experiment(
        "mid-run", artifact_location=(tmp_path / "mlflow-artifacts").as_uri()
    )
    monkeypatch.setenv("TUNEFORGE_MLFLOW_TRACKING_URI", uri)
    get_settings.cache_clear()
    yield uri
    get_settings.cache_clear()


def test_a_tracker_failing_mid_run_is_a_notice_and_the_run_succeeds(
    tiny_chat_path: Path, tmp_path: Path, mlflow_uri: str
) -> None:
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    spec = JobSpec.model_validate(
        {
            "model": "tuneforge/tiny-chat",
            "training_file": "file-local",
            "seed": 7,
            "method": {"type": "supervised", "supervised": {"hyperparameters": {"max_steps": STEPS}}},
            "integrations": [
                {"type": "mlflow", "mlflow": {"experiment": "mid-run", "run_name": "sabotaged"}},
                {"type": "tensorboard"},
            ],
        }
    )
    observer = SabotagingObserver(tracking_uri=mlflow_uri)
    finished = train(spec, tiny_chat_path, DATA / "qa.jsonl", tmp_path / "out", observer)

    result = finished.result
    assert (result.stopped, result.final_step) == (None, STEPS)
    assert result.adapter_dir is not None and (result.adapter_dir / "adapter_model.safetensors").exists()
    assert [m.step for m in observer.metrics] == list(range(1, STEPS + 1))

    [(message, data)] = observer.notices
    assert data == {"integration": "mlflow", "step": 2}
    assert message.startswith("The mlflow integration failed while logging at step 2 (MlflowException)")
    assert "training goes on" in message

    # MLflow has what it logged before it failed; nothing is logged after (the tracker is dropped,
    # so it does not mark the deleted run finished either)
    client = MlflowClient(tracking_uri=mlflow_uri)
    experiment = client.get_experiment_by_name("mid-run")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id], run_view_type=3)  # ViewType.ALL
    assert run.info.lifecycle_stage == "deleted" and run.info.status == "RUNNING"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1]

    # The other tracker logged every step and its event files are the run's
    assert result.tensorboard_dir is not None
    events = EventAccumulator(str(result.tensorboard_dir))
    events.Reload()
    assert [e.step for e in events.Scalars("train_loss")] == list(range(1, STEPS + 1))
