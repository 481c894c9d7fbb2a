"""Iterating on a model through the openai SDK (issue 8): a job continues from a fine-tuned model or
one of its checkpoints, SFT then DPO keeps what SFT taught, bad sources are 400s, and a deleted
model is gone. One job A (LoRA that learns four Q&A pairs, with a merged export) is shared by every test."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from tuneforge.storage import open_store
from tuneforge.storage.keys import job_prefix

from .conftest import Stack
from .flows import download_adapter, metric_events, wait_job
from .qa_eval import qa_accuracy

pytestmark = pytest.mark.slow

DATA = Path(__file__).resolve().parents[1] / "data"
BASE = "tuneforge/tiny-chat"
# Four pairs, 50 steps: learned exactly (measured: 4/4 right, loss 6.9 -> 2.0).
QA_PAIRS = 4
LEARN: dict[str, Any] = {
    "n_epochs": 50,
    "batch_size": 4,
    "learning_rate": 3e-3,
    "lr_scheduler_type": "constant",
    "save_every_steps": 25,
}
ADAPTER = {"type": "lora", "dropout": 0.0, "alpha": 64}


@dataclass(frozen=True)
class Learned:
    job_id: str
    fine_tuned_model: str
    checkpoint_id: str
    checkpoint_name: str
    first_loss: float
    qa_file: str
    qa_path: Path


def _upload(client: OpenAI, path: Path) -> str:
    with path.open("rb") as handle:
        return client.files.create(file=(path.name, handle), purpose="fine-tune").id


def _first_loss(client: OpenAI, job_id: str) -> float:
    return float(next(m["train_loss"] for m in metric_events(client, job_id) if m.get("train_loss")))


SHORT: dict[str, Any] = {"max_steps": 4, "batch_size": 4, "learning_rate": 3e-3}


def _create(
    client: OpenAI,
    model: str,
    training_file: str,
    method: str = "supervised",
    hyperparameters: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    section: Any = {"type": method, method: {"hyperparameters": hyperparameters or SHORT}}
    return client.fine_tuning.jobs.create(
        model=model, training_file=training_file, seed=5, method=section, extra_body=extra
    ).id


@pytest.fixture(scope="module")
def learned(distributed: Stack, tmp_path_factory: pytest.TempPathFactory) -> Learned:
    client = distributed.sdk()
    qa = tmp_path_factory.mktemp("iterate") / "qa4.jsonl"
    qa.write_text("".join(line + "\n" for line in (DATA / "qa.jsonl").read_text().splitlines()[:QA_PAIRS]))
    training_file = _upload(client, qa)
    job_id = _create(
        client, BASE, training_file, hyperparameters=LEARN, extra={"adapter": ADAPTER, "export": ["merged"]}
    )
    job = wait_job(client, job_id, timeout=1500)
    assert job.status == "succeeded" and job.fine_tuned_model, (job.error, distributed.logs())
    checkpoint = next(c for c in client.fine_tuning.jobs.checkpoints.list(job_id).data if c.step_number == 25)
    return Learned(
        job_id,
        job.fine_tuned_model,
        checkpoint.id,
        checkpoint.fine_tuned_model_checkpoint,
        _first_loss(client, job_id),
        training_file,
        qa,
    )


def test_continue_from_fine_tuned_model_starts_from_its_weights(
    distributed: Stack, learned: Learned, tiny_chat_path: Path, tmp_path: Path
) -> None:
    client = distributed.sdk()
    job_id = _create(client, learned.fine_tuned_model, learned.qa_file)
    created: dict[str, Any] = client.fine_tuning.jobs.retrieve(job_id).to_dict()
    assert created["model"] == learned.fine_tuned_model
    assert created["base_model"] == BASE
    assert created["parent"] == {"job": learned.job_id, "checkpoint": None}
    assert created["adapter"]["alpha"] == 64  # the source's adapter carries over
    job = wait_job(client, job_id, timeout=900)
    assert job.status == "succeeded", (job.error, distributed.logs())
    assert job.fine_tuned_model and job.fine_tuned_model.startswith(f"ft:{BASE}:")
    first = _first_loss(client, job_id)
    assert first < 0.6 * learned.first_loss, (first, learned.first_loss)
    events = client.fine_tuning.jobs.list_events(job_id, limit=100).data
    lineage: list[dict[str, Any]] = [e.to_dict() for e in events if e.message.startswith("Continuing")]
    assert lineage and lineage[0]["data"]["parent"] == {"job": learned.job_id, "checkpoint": None}

    adapter = download_adapter(distributed, job_id, tmp_path / "b")
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == BASE
    assert not (adapter / "ref").exists()
    assert qa_accuracy(tiny_chat_path, adapter, learned.qa_path) >= 0.75


def test_continue_from_checkpoint_with_its_optimizer_state(distributed: Stack, learned: Learned) -> None:
    client = distributed.sdk()
    assert client.models.retrieve(learned.checkpoint_name).id == learned.checkpoint_name
    job_id = _create(
        client,
        learned.checkpoint_name,
        learned.qa_file,
        hyperparameters={"max_steps": 2, "batch_size": 4, "learning_rate": 3e-3},
        extra={"continue": {"optimizer_state": True}},
    )
    job = wait_job(client, job_id, timeout=900)
    assert job.status == "succeeded", (job.error, distributed.logs())
    assert job.to_dict()["parent"] == {"job": learned.job_id, "checkpoint": learned.checkpoint_id}
    assert _first_loss(client, job_id) < 0.8 * learned.first_loss


def test_dpo_from_the_supervised_model_keeps_its_answers(
    distributed: Stack, learned: Learned, tiny_chat_path: Path, tmp_path: Path
) -> None:
    client = distributed.sdk()
    preferences = _upload(client, DATA / "preferences.jsonl")
    gentle = {"max_steps": 4, "batch_size": 4, "learning_rate": 1e-4}
    job_id = _create(client, learned.fine_tuned_model, preferences, method="dpo", hyperparameters=gentle)
    job = wait_job(client, job_id, timeout=900)
    assert job.status == "succeeded", (job.error, distributed.logs())
    assert job.method is not None and job.method.type == "dpo"
    # The reference is the supervised model (TRL's frozen copy of its adapter): at the first step
    # policy and reference agree, so the sigmoid DPO loss is exactly log 2 (against the raw base
    # it would not be). Loaded onto the raw base, the DPO adapter still answers; the base does not.
    assert abs(_first_loss(client, job_id) - math.log(2)) < 1e-3
    adapter = download_adapter(distributed, job_id, tmp_path / "dpo")
    assert qa_accuracy(tiny_chat_path, adapter, learned.qa_path) >= 0.75
    assert qa_accuracy(tiny_chat_path, None, learned.qa_path) == 0
    # The same DPO job from the raw base answers none: the answers came from the supervised stage.
    raw_id = _create(client, BASE, preferences, method="dpo", hyperparameters=gentle)
    raw = wait_job(client, raw_id, timeout=900)
    assert raw.status == "succeeded", (raw.error, distributed.logs())
    assert (
        qa_accuracy(
            tiny_chat_path, download_adapter(distributed, raw_id, tmp_path / "raw-dpo"), learned.qa_path
        )
        == 0
    )


def test_full_fine_tuning_from_the_merged_model_starts_from_its_weights(
    distributed: Stack, learned: Learned
) -> None:
    """Job A exported merged weights, so a full fine-tuning job may continue from its model: it
    trains those weights (first loss far below A's), and its result is full weights."""
    client = distributed.sdk()
    gentle = {"max_steps": 2, "batch_size": 4, "learning_rate": 1e-5}
    full = {"adapter": {"type": "full"}}
    job_id = _create(client, learned.fine_tuned_model, learned.qa_file, hyperparameters=gentle, extra=full)
    job = wait_job(client, job_id, timeout=900)
    assert job.status == "succeeded", (job.error, distributed.logs())
    assert job.to_dict()["parent"] == {"job": learned.job_id, "checkpoint": None}
    first = _first_loss(client, job_id)
    assert first < 0.6 * learned.first_loss, (first, learned.first_loss)
    with distributed.http() as http:
        names = {a["name"] for a in http.get(f"/v1/fine_tuning/jobs/{job_id}/artifacts").json()["data"]}
    assert "model" in names and "adapter" not in names


def _refused(client: OpenAI, model: str, training_file: str, param: str, extra: Any = None) -> str:
    with pytest.raises(openai.BadRequestError) as caught:
        _create(client, model, training_file, extra=extra)
    error = caught.value.body
    assert isinstance(error, dict) and error.get("param") == param, error
    return str(error["message"])


def test_sources_that_are_not_the_callers_succeeded_models_are_400(
    distributed: Stack, learned: Learned
) -> None:
    client = distributed.sdk()
    unknown = _refused(client, "ft:tuneforge/tiny-chat:nobody::deadbeef", learned.qa_file, "model")
    _refused(client, learned.fine_tuned_model + ":ckpt-step-999", learned.qa_file, "model")
    _refused(client, learned.fine_tuned_model, learned.qa_file, "adapter.type", {"adapter": {"type": "ia3"}})
    _refused(client, BASE, learned.qa_file, "continue", {"continue": {"optimizer_state": True}})
    _refused(
        client,
        learned.fine_tuned_model,
        learned.qa_file,
        "continue.optimizer_state",
        extra={"continue": {"optimizer_state": True}},
    )
    # Another project gets exactly the answer an unknown name gets: no hint that the model exists.
    admin = {"Authorization": f"Bearer {distributed.key}"}
    with httpx.Client(base_url=distributed.base_url, timeout=60) as http:
        project = http.post("/v1/admin/projects", json={"name": "other"}, headers=admin).json()
        key = http.post(f"/v1/admin/projects/{project['id']}/api_keys", headers=admin).json()["value"]
    other = OpenAI(base_url=distributed.base_url + "/v1", api_key=key, max_retries=0)
    theirs = _upload(other, learned.qa_path)
    foreign = _refused(other, learned.fine_tuned_model, theirs, "model")
    assert foreign == unknown.replace("ft:tuneforge/tiny-chat:nobody::deadbeef", learned.fine_tuned_model)
    with pytest.raises(openai.NotFoundError):
        other.models.retrieve(learned.fine_tuned_model)


def test_deleted_model_is_gone_and_cannot_be_continued(distributed: Stack, learned: Learned) -> None:
    """Last: it deletes job A's model."""
    client = distributed.sdk()
    deleted = client.models.delete(learned.fine_tuned_model)
    assert (deleted.id, deleted.object, deleted.deleted) == (learned.fine_tuned_model, "model", True)
    assert learned.fine_tuned_model not in {m.id for m in client.models.list().data}
    for name in (learned.fine_tuned_model, learned.checkpoint_name):
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve(name)
        _refused(client, name, learned.qa_file, "model")
    with distributed.http() as http:
        assert http.get(f"/v1/fine_tuning/jobs/{learned.job_id}/artifacts").json()["data"] == []
        assert http.get(f"/v1/fine_tuning/jobs/{learned.job_id}/artifacts/adapter").status_code == 404
    store = open_store(distributed.env["TUNEFORGE_STORAGE_URL"], distributed.env["TUNEFORGE_S3_ENDPOINT_URL"])
    assert list(store.list(job_prefix(learned.job_id))) == []
    assert client.fine_tuning.jobs.retrieve(learned.job_id).status == "succeeded"  # the job stays
    with pytest.raises(openai.NotFoundError):
        client.models.delete(learned.fine_tuned_model)
