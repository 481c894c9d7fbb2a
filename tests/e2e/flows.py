"""What a user does with the SDK: upload, create, watch, download, load. Shared by both stacks."""

from __future__ import annotations

import csv
import hashlib
import io
import tarfile
import time
from pathlib import Path
from typing import Any

from openai import OpenAI
from openai.types.fine_tuning import FineTuningJob

from .conftest import Stack

TERMINAL = {"succeeded", "failed", "cancelled"}

# Supervised LoRA on the 32 QA pairs: what tests/training/test_learning.py teaches tiny-chat with.
QA_HYPERPARAMETERS: dict[str, Any] = {
    "n_epochs": 50,
    "batch_size": 8,
    "learning_rate": 3e-3,
    "lr_scheduler_type": "constant",
    "save_every_steps": 50,
}
QA_ADAPTER: dict[str, Any] = {"type": "lora", "dropout": 0.0}


def wait_job(client: OpenAI, job_id: str, timeout: float, until: set[str] | None = None) -> FineTuningJob:
    until = until or TERMINAL
    deadline = time.monotonic() + timeout
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in until:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {job.status} after {timeout}s")
        time.sleep(0.5)


def create_job(
    client: OpenAI,
    training_path: Path,
    *,
    method: str = "supervised",
    hyperparameters: dict[str, Any],
    adapter: dict[str, Any] | None = None,
    suffix: str = "e2e",
) -> str:
    with training_path.open("rb") as handle:
        uploaded = client.files.create(file=(training_path.name, handle), purpose="fine-tune")
    # No automatic retry: creating a job is not idempotent, and on a loaded machine a create that
    # outlasts the client's timeout would be sent twice (two jobs, the test waiting on one).
    job = client.with_options(max_retries=0, timeout=600).fine_tuning.jobs.create(
        model="tuneforge/tiny-chat",
        training_file=uploaded.id,
        suffix=suffix,
        seed=11,
        method={"type": method, method: {"hyperparameters": hyperparameters}},  # type: ignore[misc,dict-item]
        extra_body={"adapter": adapter or {"type": "lora"}},
    )
    return job.id


def metric_events(client: OpenAI, job_id: str) -> list[dict[str, Any]]:
    data = [e for e in client.fine_tuning.jobs.list_events(job_id, limit=1000).data if e.type == "metrics"]
    return sorted((e.data for e in data if e.data), key=lambda d: d["step"])  # type: ignore[no-any-return]


def check_succeeded_job(stack: Stack, job_id: str, tmp: Path, *, redirect: bool = False) -> Path:
    """Everything a finished job must have; returns the unpacked adapter directory."""
    client = stack.sdk()
    job = client.fine_tuning.jobs.retrieve(job_id)
    assert job.status == "succeeded", (job.status, job.error, stack.logs())
    assert job.fine_tuned_model and job.fine_tuned_model.startswith("ft:tuneforge/tiny-chat:")
    assert job.trained_tokens and job.trained_tokens > 0
    assert job.fine_tuned_model in {m.id for m in client.models.list().data}

    metrics = metric_events(client, job_id)
    losses = [m["train_loss"] for m in metrics if m.get("train_loss") is not None]
    assert len(losses) >= 2 and min(losses[-3:]) < losses[0], losses
    steps = [m["step"] for m in metrics]
    # One point per step, a resumed job's too: its new attempt trains the steps after its last
    # checkpoint again without reporting them again.
    assert len(steps) == len(set(steps)), "a metrics step was logged twice"

    checkpoints = client.fine_tuning.jobs.checkpoints.list(job_id).data
    assert checkpoints and all(c.step_number > 0 for c in checkpoints)

    csv_bytes = client.files.content(job.result_files[0]).read()
    rows = list(csv.DictReader(io.StringIO(csv_bytes.decode())))
    assert rows and "train_loss" in rows[0] and rows[0]["step"] == "1"

    with stack.http() as http:
        listing = http.get(f"/v1/fine_tuning/jobs/{job_id}/artifacts").json()["data"]
        adapter = next(a for a in listing if a["name"] == "adapter")
        if redirect:
            answer = http.get(f"/v1/fine_tuning/jobs/{job_id}/artifacts/adapter", params={"redirect": "true"})
            assert answer.status_code == 307
            body = httpx_get(answer.headers["location"])
        else:
            body = http.get(f"/v1/fine_tuning/jobs/{job_id}/artifacts/adapter").content
        ckpt = http.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints/{checkpoints[0].id}/artifacts/adapter")
        assert ckpt.status_code == 200 and ckpt.content[:2] == b"\x1f\x8b"
    assert len(body) == adapter["bytes"]
    assert hashlib.sha256(body).hexdigest() == adapter["sha256"]
    target = tmp / job_id / "adapter"
    target.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as tar:
        names = tar.getnames()
        tar.extractall(target, filter="data")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(names), names
    return target


def download_adapter(stack: Stack, job_id: str, target: Path) -> Path:
    """The job's adapter artifact through the API, unpacked into `target` (PEFT's layout)."""
    with stack.http() as http:
        body = http.get(f"/v1/fine_tuning/jobs/{job_id}/artifacts/adapter")
    assert body.status_code == 200, body.text
    with tarfile.open(fileobj=io.BytesIO(body.content), mode="r:gz") as tar:
        tar.extractall(target, filter="data")
    return target


def httpx_get(url: str) -> bytes:
    import httpx

    answer = httpx.get(url, timeout=60)
    answer.raise_for_status()
    return answer.content


def load_adapter(base_dir: Path, adapter_dir: Path) -> None:
    """The adapter loads with PEFT onto tiny-chat and generates."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    ids = tokenizer("hello", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
