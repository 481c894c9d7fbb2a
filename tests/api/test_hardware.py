"""The create-job extension `hardware` over HTTP, through the official SDK's `extra_body`: the
CONTRACT's `{"count": N, "strategy": "auto"|"ddp"|"fsdp"}` is accepted and echoed on the job
object, `auto` resolves as README says (fsdp for `full`, ddp otherwise) in the function the worker
launches with, and a bad count or strategy is a 400 naming `hardware.count` / `hardware.strategy`.
Training on several devices is tests/worker/test_distributed_training.py's."""

from __future__ import annotations

from typing import Any

import openai
import pytest
from fastapi import FastAPI

from tests.api.conftest import ProjectCtx
from tuneforge.models.job import Job
from tuneforge.models.spec import MAX_DEVICES, JobSpec
from tuneforge.training.distributed import strategy_for
from tuneforge.worker.launcher import job_devices

MODEL = "tuneforge/tiny-chat"


def _create(project: ProjectCtx, file_id: str, **extra: Any) -> Any:
    return project.openai.fine_tuning.jobs.create(model=MODEL, training_file=file_id, extra_body=extra)


def _stored_spec(app: FastAPI, job_id: str) -> dict[str, Any]:
    with app.state.sessionmaker() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return dict(job.spec)


def test_a_job_asks_for_devices_and_shows_them(project: ProjectCtx, app: FastAPI, chat_jsonl: str) -> None:
    file_id = project.upload(chat_jsonl)
    adapter_job = _create(
        project, file_id, adapter={"type": "lora", "r": 8}, hardware={"count": 2, "strategy": "ddp"}
    )
    full_job = _create(project, file_id, adapter={"type": "full"}, hardware={"count": 4, "strategy": "fsdp"})
    plain = _create(project, file_id)

    assert adapter_job.status == "validating_files"
    assert adapter_job.model_dump()["hardware"] == {"count": 2, "strategy": "ddp"}
    assert full_job.model_dump()["hardware"] == {"count": 4, "strategy": "fsdp"}
    assert full_job.model_dump()["adapter"]["type"] == "full"
    assert plain.model_dump()["hardware"] is None
    for job in (adapter_job, full_job, plain):
        assert project.openai.fine_tuning.jobs.retrieve(job.id).model_dump() == job.model_dump()
    listed = {job.id: job.model_dump()["hardware"] for job in project.openai.fine_tuning.jobs.list()}
    assert listed == {
        adapter_job.id: {"count": 2, "strategy": "ddp"},
        full_job.id: {"count": 4, "strategy": "fsdp"},
        plain.id: None,
    }

    # What the worker reads from the stored spec: how many processes, and DDP or FSDP.
    launched = {
        job.id: (job_devices(spec := _stored_spec(app, job.id)), strategy_for(JobSpec.model_validate(spec)))
        for job in (adapter_job, full_job, plain)
    }
    assert launched == {adapter_job.id: (2, "ddp"), full_job.id: (4, "fsdp"), plain.id: (1, "ddp")}


def test_strategy_auto_is_fsdp_for_full_and_ddp_for_adapters(
    project: ProjectCtx, app: FastAPI, chat_jsonl: str
) -> None:
    file_id = project.upload(chat_jsonl)
    cases: list[tuple[dict[str, str], dict[str, Any], str]] = [
        ({"type": "full"}, {"count": 2}, "fsdp"),
        ({"type": "full"}, {"count": 2, "strategy": "auto"}, "fsdp"),
        ({"type": "lora"}, {"count": 2}, "ddp"),
        ({"type": "dora"}, {"count": 3, "strategy": "auto"}, "ddp"),
        ({"type": "full"}, {"count": 2, "strategy": "ddp"}, "ddp"),  # asked for: no auto to resolve
        ({"type": "lora"}, {"count": 2, "strategy": "fsdp"}, "fsdp"),
    ]
    for adapter, hardware, resolved in cases:
        job = _create(project, file_id, adapter=adapter, hardware=hardware)
        shown = job.model_dump()["hardware"]
        assert shown == {"strategy": "auto", **hardware}, (adapter, shown)
        spec = JobSpec.model_validate(_stored_spec(app, job.id))
        assert strategy_for(spec) == resolved, (adapter, hardware)
    defaults = _create(project, file_id, hardware={})
    assert defaults.model_dump()["hardware"] == {"count": 1, "strategy": "auto"}


BAD_HARDWARE: list[tuple[Any, str]] = [
    ({"count": 0}, "hardware.count"),
    ({"count": -1}, "hardware.count"),
    ({"count": MAX_DEVICES + 1}, "hardware.count"),
    ({"count": 10**6}, "hardware.count"),
    ({"count": "two"}, "hardware.count"),
    ({"count": 1.5}, "hardware.count"),
    ({"count": None}, "hardware.count"),
    ({"count": [2]}, "hardware.count"),
    ({"count": 2, "strategy": "tp"}, "hardware.strategy"),
    ({"count": 2, "strategy": "DDP"}, "hardware.strategy"),
    ({"count": 2, "strategy": ""}, "hardware.strategy"),
    ({"count": 2, "strategy": None}, "hardware.strategy"),
    ({"count": 2, "strategy": 2}, "hardware.strategy"),
    ({"count": 2, "nodes": 2}, "hardware.nodes"),
    ("2", "hardware"),
    ([{"count": 2}], "hardware"),
]


def test_bad_count_or_strategy_is_a_400_naming_it(project: ProjectCtx, chat_jsonl: str) -> None:
    file_id = project.upload(chat_jsonl)
    for hardware, param in BAD_HARDWARE:
        with pytest.raises(openai.BadRequestError) as caught:
            _create(project, file_id, hardware=hardware)
        assert caught.value.status_code == 400
        error = caught.value.body
        assert isinstance(error, dict), caught.value
        assert error["param"] == param, (hardware, error)
        assert error["type"] == "invalid_request_error", error
        assert error["message"], error
    assert project.openai.fine_tuning.jobs.list().data == []


def test_the_refusals_say_what_is_allowed(project: ProjectCtx, chat_jsonl: str) -> None:
    file_id = project.upload(chat_jsonl)

    def message(hardware: dict[str, Any]) -> str:
        with pytest.raises(openai.BadRequestError) as caught:
            _create(project, file_id, hardware=hardware)
        assert isinstance(caught.value.body, dict)
        return str(caught.value.body["message"])

    assert str(MAX_DEVICES) in message({"count": MAX_DEVICES + 1})
    assert "1" in message({"count": 0})
    strategy = message({"strategy": "tp"})
    assert all(name in strategy for name in ("auto", "ddp", "fsdp")), strategy
