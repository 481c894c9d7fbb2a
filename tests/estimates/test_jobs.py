"""Each job stores the estimate made at creation; with worker classes configured, a job that fits
none is refused with a clear 400 (unless TUNEFORGE_REFUSE_UNFIT_JOBS is off)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tuneforge.config import Settings
from tuneforge.db import migrate
from tuneforge.estimates.jobs import parse_worker_classes

ADMIN_KEY = "tf-admin-estimates-jobs-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
MiB = 2**20


@pytest.fixture
def make_client(
    tmp_path: Path, models_dir: Path, tiny_chat_path: Path
) -> Iterator[Callable[..., TestClient]]:
    from tuneforge.api.app import create_app

    clients: list[TestClient] = []

    def make(**overrides: Any) -> TestClient:
        data_dir = tmp_path / f"data{len(clients)}"
        data_dir.mkdir()
        url = f"sqlite:///{data_dir / 'tuneforge.db'}"
        migrate(url)
        settings = Settings(data_dir=data_dir, database_url=url, admin_key=ADMIN_KEY, **overrides)  # type: ignore[arg-type]
        client = TestClient(create_app(settings), raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)
        client.app.state.engine.dispose()  # type: ignore[attr-defined]


def _create(client: TestClient, qa_path: Path, **body: Any) -> Any:
    upload = client.post(
        "/v1/files",
        headers=AUTH,
        files={"file": ("qa.jsonl", qa_path.read_bytes())},
        data={"purpose": "fine-tune"},
    )
    assert upload.status_code == 200, upload.text
    job = {"model": "tuneforge/tiny-chat", "training_file": upload.json()["id"], **body}
    return client.post("/v1/fine_tuning/jobs", headers=AUTH, json=job)


def test_job_stores_its_estimate(make_client: Callable[..., TestClient], qa_path: Path) -> None:
    client = make_client(worker_classes="gpu=80")
    response = _create(client, qa_path, adapter={"type": "lora", "r": 8})
    assert response.status_code == 200, response.text
    job = response.json()
    estimate = job["estimate"]
    assert estimate["trainable_params"] > 0
    assert estimate["memory"]["total"] > 0
    assert estimate["worker_classes"] == {"gpu": True}
    assert estimate["hardware"] == "gpu"
    assert estimate["steps"] == 4 * 8  # 32 examples: the recipe's auto rules give 4 epochs of batch 4
    again = client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=AUTH).json()
    assert again["estimate"] == estimate


def test_job_without_worker_classes_still_gets_an_estimate(
    make_client: Callable[..., TestClient], qa_path: Path
) -> None:
    response = _create(make_client(), qa_path)
    assert response.status_code == 200, response.text
    assert response.json()["estimate"]["fits"] is None


def test_job_that_fits_no_worker_class_is_refused(
    make_client: Callable[..., TestClient], qa_path: Path
) -> None:
    client = make_client(worker_classes="gpu=0.2,small=0.1")  # GiB: 200 MiB and 100 MiB
    body = {"adapter": {"type": "full"}, "hyperparameters": {"batch_size": 16, "max_seq_length": 2048}}
    response = _create(client, qa_path, **body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "job_does_not_fit"
    assert error["param"] == "adapter"
    assert "GiB" in error["message"] and "queue 'gpu'" in error["message"]


def test_refusal_can_be_turned_off(make_client: Callable[..., TestClient], qa_path: Path) -> None:
    client = make_client(worker_classes="gpu=0.1", refuse_unfit_jobs=False)
    response = _create(client, qa_path, adapter={"type": "full"}, hyperparameters={"max_seq_length": 2048})
    assert response.status_code == 200, response.text
    assert response.json()["estimate"]["worker_classes"] == {"gpu": False}


def test_unmatched_target_modules_refused_at_creation(
    make_client: Callable[..., TestClient], qa_path: Path
) -> None:
    response = _create(make_client(), qa_path, adapter={"type": "lora", "target_modules": ["attn"]})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "adapter.target_modules"
    assert "q_proj" in error["message"]


def test_parse_worker_classes() -> None:
    assert parse_worker_classes("gpu=80, small=24") == {"gpu": 80.0, "small": 24.0}
    assert parse_worker_classes("") == {}
    for bad in ("gpu", "gpu=", "=80", "gpu=-1", "gpu=lots"):
        with pytest.raises(ValueError, match="queue=GiB"):
            parse_worker_classes(bad)


def test_big_model_job_is_estimated_with_checkpointing_like_the_recipe(tmp_path: Path) -> None:
    """A configured model needs only its config.json here; on a GPU class, a model of 300M+
    parameters is estimated with gradient checkpointing, which the recipe turns on for it."""
    import json

    from tests.estimates.test_estimates import LLAMA_31_8B
    from tuneforge.estimates import FileStats
    from tuneforge.estimates.jobs import job_estimate
    from tuneforge.models.spec import JobSpec

    model_dir = tmp_path / "llama-8b"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(LLAMA_31_8B))
    settings = Settings(data_dir=tmp_path, models=f"meta/llama-8b={model_dir}", worker_classes="gpu=80")
    spec = JobSpec.model_validate(
        {"model": "meta/llama-8b", "training_file": "file-x", "adapter": {"type": "qlora"}}
    )
    estimate = job_estimate(spec, FileStats(examples=5000, approx_tokens=2_000_000), settings)
    assert estimate is not None
    assert any("gradient checkpointing" in note for note in estimate["memory_notes"])
    assert estimate["worker_classes"] == {"gpu": True}
    assert estimate["trainable_params"] == 41_943_040  # r=16 on every linear layer but the head


def test_worker_class_refusal_sizes_each_device_of_a_multi_device_job(
    make_client: Callable[..., TestClient], qa_path: Path, tmp_path: Path
) -> None:
    """Full fine-tuning of a 1.1B model needs about 10 GiB a device: an 8 GiB worker class
    refuses it on one device and on 4 under DDP (a whole replica each), and takes it on 4 under
    FSDP (a quarter of the weights, gradients and optimizer state each), which `auto` picks for
    `full`. The stored estimate is the per-device one."""
    import json

    from tests.estimates.test_api import LLAMA_1B

    model_dir = tmp_path / "llama-1b"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(LLAMA_1B))
    client = make_client(
        models=f"meta/llama-1b={model_dir}", worker_classes="gpu=8", estimate_build_seconds=0
    )
    full = {
        "model": "meta/llama-1b",
        "adapter": {"type": "full"},
        "hyperparameters": {"batch_size": 8, "max_seq_length": 512},
    }

    def create(**hardware: Any) -> Any:
        return _create(client, qa_path, **full, **({"hardware": hardware} if hardware else {}))

    for refused in (create(), create(count=4, strategy="ddp")):
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert error["code"] == "job_does_not_fit", error
        assert "GiB per device" in error["message"] and "queue 'gpu' (8 GiB)" in error["message"], error
    sharded, auto = create(count=4, strategy="fsdp"), create(count=4)
    assert sharded.status_code == auto.status_code == 200, (sharded.text, auto.text)
    estimate = sharded.json()["estimate"]
    assert estimate["worker_classes"] == {"gpu": True}
    assert estimate["memory"]["total"] < 8 * 2**30 < estimate["memory"]["total"] * 4
    assert any("sharded over 4 devices" in note for note in estimate["memory_notes"])
    assert auto.json()["estimate"]["memory"] == estimate["memory"]
    assert auto.json()["hardware"] == {"count": 4, "strategy": "auto"}
