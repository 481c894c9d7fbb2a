"""`make run` + the openai SDK: upload -> job -> downloadable adapter that PEFT loads and that
answers the QA set, with the embedded worker (a real Celery worker process) and no services."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import Stack
from .flows import QA_ADAPTER, QA_HYPERPARAMETERS, check_succeeded_job, create_job, wait_job
from .qa_eval import qa_accuracy

pytestmark = pytest.mark.slow


def test_supervised_lora_job_end_to_end(
    embedded: Stack, qa_path: Path, tiny_chat_path: Path, tmp_path: Path
) -> None:
    client = embedded.sdk()
    job_id = create_job(client, qa_path, hyperparameters=QA_HYPERPARAMETERS, adapter=QA_ADAPTER)
    job = wait_job(client, job_id, timeout=600)
    assert job.status == "succeeded", (job.error, embedded.logs())
    adapter_dir = check_succeeded_job(embedded, job_id, tmp_path)
    assert qa_accuracy(tiny_chat_path, adapter_dir, qa_path) >= 0.9
