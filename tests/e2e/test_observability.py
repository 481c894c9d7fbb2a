"""Metrics and tracking integrations on the embedded stack (`tuneforge serve` with its worker),
with one trained job shared by every check: W&B (offline), MLflow (a local SQLite store) and
TensorBoard carry the same per-step train loss as the job's metrics CSV; a tracker that fails is
an event, not a failed job; /metrics of the API and of the worker parse with prometheus-client's
parser and move as the job runs."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import REPO, free_port, wait_for

from .conftest import Stack, _base_env
from .flows import wait_job

pytestmark = pytest.mark.slow

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
STEPS = 4


def scrape(url: str) -> Samples:
    answer = httpx.get(url, timeout=10)
    assert answer.status_code == 200, answer.text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wandb_records(path: Path) -> Iterator[bytes]:
    """The records of a W&B run file (`run-*.wandb`): a LevelDB-style log of 32 KiB blocks after a
    7-byte header, each record `crc32 (4) | length (2) | type (1) | data` (1 full, 2 first, 3
    middle, 4 last). wandb 0.31 no longer ships a Python reader."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, partial = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            partial = chunk
        elif kind == 3:
            partial += chunk
        elif kind == 4:
            yield partial + chunk


def wandb_history(wandb_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from wandb.proto import wandb_internal_pb2

    (path,) = wandb_dir.glob("wandb/offline-run-*/run-*.wandb")
    run: dict[str, Any] = {}
    history = []
    for raw in wandb_records(path):
        record = wandb_internal_pb2.Record()  # type: ignore[attr-defined]
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = {"project": record.run.project, "tags": list(record.run.tags)}
        elif kind == "history":
            history.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
    return run, history


@dataclass
class Observed:
    stack: Stack
    worker_metrics: str
    mlflow_uri: str
    wandb_dir: Path


@pytest.fixture(scope="module")
def observed(
    tmp_path_factory: pytest.TempPathFactory, tiny_chat_path: Path, models_dir: Path
) -> Iterator[Observed]:
    """`make run`'s embedded stack, with the worker's /metrics, W&B offline and a local MLflow store."""
    tmp = tmp_path_factory.mktemp("observability")
    port, metrics_port = free_port(), free_port()
    env = _base_env(tmp, models_dir)
    mlflow_uri = f"sqlite:///{tmp / 'mlflow.db'}"
    env.update(
        {
            "TUNEFORGE_WORKER_METRICS_PORT": str(metrics_port),
            "TUNEFORGE_WORKER_METRICS_HOST": "127.0.0.1",
            "TUNEFORGE_MLFLOW_TRACKING_URI": mlflow_uri,
            "TUNEFORGE_WANDB_ENABLED": "true",
            "WANDB_MODE": "offline",
            "WANDB_DIR": str(tmp / "wandb-runs"),
            "WANDB_SILENT": "true",
        }
    )
    stack = Stack(f"http://127.0.0.1:{port}", "", env, tmp)
    subprocess.run([sys.executable, "-m", "tuneforge.cli", "migrate"], env=env, check=True, cwd=REPO)
    stack.start("serve", "serve", "--port", str(port))
    try:
        stack.wait_healthy()
        stack.key = (tmp / "data" / "admin_key").read_text().strip()
        yield Observed(stack, f"http://127.0.0.1:{metrics_port}/metrics", mlflow_uri, tmp / "wandb-runs")
    finally:
        stack.stop_all()


def _mlflow_experiments(uri: str, artifacts: Path) -> None:
    """Experiments made ahead: one whose artifacts go under the test's directory (an SQLite store's
    default is ./mlruns of the worker's working directory), and a deleted one, which no run can
    be logged to: the integration that names it fails while the job goes on."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    client.create_experiment("tuneforge-e2e", artifact_location=artifacts.as_uri())
    client.delete_experiment(client.create_experiment("gone", artifact_location=artifacts.as_uri()))


def test_one_job_logs_to_every_tracker_and_moves_the_metrics(
    observed: Observed, qa_path: Path, tmp_path: Path
) -> None:
    stack = observed.stack
    client = stack.sdk()
    api_metrics = stack.base_url + "/metrics"
    _mlflow_experiments(observed.mlflow_uri, tmp_path / "mlflow-artifacts")
    # The embedded worker imports torch first; 60 s was not enough beside a training test.
    wait_for(lambda: _answers(observed.worker_metrics), 240, "the worker's /metrics to answer", stack)
    # Its main process beats from the start: a worker whose metrics were created before its
    # multiprocess set-up served an empty page here (and never anything its pool recorded).
    worker_before = wait_for(
        lambda: (
            (got := scrape(observed.worker_metrics))
            and value(got, "tuneforge_worker_heartbeat_timestamp_seconds") > 0
            and got
        ),
        30,
        "the worker's heartbeat on its /metrics",
        stack,
    )
    api_before = scrape(api_metrics)

    training = client.files.create(file=qa_path.open("rb"), purpose="fine-tune")
    # One job exactly: a create retried after a slow answer would make a second one.
    job = client.with_options(timeout=300, max_retries=0).fine_tuning.jobs.create(
        model="tuneforge/tiny-chat",
        training_file=training.id,
        seed=5,
        method={  # type: ignore[arg-type]
            "type": "supervised",
            "supervised": {"hyperparameters": {"max_steps": STEPS, "batch_size": 8, "learning_rate": 3e-3}},
        },
        extra_body={
            "integrations": [
                {"type": "wandb", "wandb": {"project": "tuneforge-e2e", "tags": ["e2e"]}},
                {
                    "type": "mlflow",
                    "mlflow": {"experiment": "tuneforge-e2e", "run_name": "qa", "tags": {"t": "1"}},
                },
                {"type": "mlflow", "mlflow": {"experiment": "gone"}},
                {"type": "tensorboard"},
            ]
        },
    )
    done = wait_job(client, job.id, timeout=600)
    assert done.status == "succeeded", (done.error, stack.logs())

    csv_text = client.files.content(done.result_files[0]).text
    expected = {int(row["step"]): float(row["train_loss"]) for row in csv.DictReader(io.StringIO(csv_text))}
    assert sorted(expected) == list(range(1, STEPS + 1))

    # W&B, offline: the run file the worker wrote
    run, history = wandb_history(observed.wandb_dir)
    assert run == {"project": "tuneforge-e2e", "tags": ["e2e"]}
    assert {h["_step"]: h["train_loss"] for h in history if "train_loss" in h} == expected

    # MLflow: metrics, params and the adapter, read back with MLflow's client
    from mlflow.tracking import MlflowClient

    mlflow = MlflowClient(tracking_uri=observed.mlflow_uri)
    experiment = mlflow.get_experiment_by_name("tuneforge-e2e")
    assert experiment is not None
    (logged,) = mlflow.search_runs([experiment.experiment_id])
    assert logged.info.run_name == "qa" and logged.info.status == "FINISHED"
    assert logged.data.tags["t"] == "1" and logged.data.params["method"] == "supervised"
    history_ml = mlflow.get_metric_history(logged.info.run_id, "train_loss")
    assert {m.step: m.value for m in history_ml} == expected
    adapter_files = {a.path for a in mlflow.list_artifacts(logged.info.run_id, "adapter")}
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= adapter_files

    # TensorBoard: the artifact's event files
    http = stack.http()
    names = {a["name"] for a in http.get(f"/v1/fine_tuning/jobs/{job.id}/artifacts").json()["data"]}
    assert "tensorboard" in names
    archive = http.get(f"/v1/fine_tuning/jobs/{job.id}/artifacts/tensorboard")
    assert archive.status_code == 200
    board = tmp_path / "tensorboard"
    with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
        tar.extractall(board, filter="data")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(board))
    events.Reload()
    scalars = {e.step: e.value for e in events.Scalars("train_loss")}
    assert scalars.keys() == expected.keys()
    assert all(scalars[s] == pytest.approx(expected[s], rel=1e-6) for s in expected)  # float32

    # The tracker that could not log is an event; the job succeeded all the same
    notices = [e for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data if e.level == "warn"]
    assert any("mlflow integration failed" in e.message for e in notices), [e.message for e in notices]

    # /metrics moved: the API's job gauges and requests, the worker's training metrics
    api_after = scrape(api_metrics)
    assert value(api_after, "tuneforge_jobs", status="succeeded") == 1 + value(
        api_before, "tuneforge_jobs", status="succeeded"
    )
    route = "/v1/fine_tuning/jobs/{fine_tuning_job_id}"
    assert value(api_after, "tuneforge_http_requests_total", method="GET", route=route, status="200") > value(
        api_before, "tuneforge_http_requests_total", method="GET", route=route, status="200"
    )

    # The run's duration is recorded once its outcome is written, just after the status the
    # client saw: wait for it rather than race it (it failed CI once as 0 moved).
    def run_counted() -> Samples | None:
        got = scrape(observed.worker_metrics)
        moved = value(got, "tuneforge_job_run_duration_seconds_count", outcome="succeeded") - value(
            worker_before, "tuneforge_job_run_duration_seconds_count", outcome="succeeded"
        )
        return got if moved >= 1 else None

    worker_after = wait_for(run_counted, 30, "the run's duration on the worker's /metrics", stack)
    for name, labels, least in (
        ("tuneforge_training_steps_total", {"queue": "gpu"}, STEPS),
        ("tuneforge_training_tokens_total", {"queue": "gpu"}, 1),
        ("tuneforge_job_time_to_first_step_seconds_count", {}, 1),
        ("tuneforge_job_run_duration_seconds_count", {"outcome": "succeeded"}, 1),
        ("tuneforge_worker_lease_renewals_total", {"result": "ok"}, 1),
    ):
        moved = value(worker_after, name, **labels) - value(worker_before, name, **labels)
        assert moved >= least, (name, moved, sorted(k for k in worker_after if k[0].startswith("tuneforge")))
    assert value(worker_after, "tuneforge_worker_heartbeat_timestamp_seconds") > 0
    assert value(worker_after, "tuneforge_training_tokens_per_second", queue="gpu") == 0  # none running now

    # The pool process that ran the job has exited (one per job): the worker's main process folds
    # its multiprocess files into the archive set, and the sums stay.
    (directory,) = (stack.tmp / "data" / "work" / "metrics").glob("worker-*")
    wait_for(lambda: _only_live_files(directory), 60, f"the dead pool process's files in {directory} to go")
    compacted = scrape(observed.worker_metrics)
    for name, labels in (
        ("tuneforge_training_steps_total", {"queue": "gpu"}),
        ("tuneforge_job_run_duration_seconds_count", {"outcome": "succeeded"}),
    ):
        assert value(compacted, name, **labels) == value(worker_after, name, **labels), name


def _only_live_files(directory: Path) -> bool:
    """Only the archive set and files of processes that run now are in the directory."""
    pids = {path.stem.rpartition("_")[2] for path in directory.glob("*.db")}
    return "archive" in pids and all(pid == "archive" or psutil.pid_exists(int(pid)) for pid in pids)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
