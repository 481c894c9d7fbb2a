"""A job may only name a queue the service runs: the default queue, the worker classes' queues
and TUNEFORGE_JOB_QUEUES. The broker's own key names, the reconciler's queue, unknown names and
names too long for a queue are a 400 naming `queue`, before anything is stored or sent."""

from __future__ import annotations

import pytest

from tests.api.conftest import ProjectCtx
from tuneforge.config import Settings
from tuneforge.worker.dispatch import UnknownQueue, allowed_queues, check_queue, queue_for

MODEL = "tuneforge/tiny-chat"

REFUSED = [
    "unacked",
    "unacked_index",
    "unacked_mutex",
    "_kombu.binding.gpu",
    "control",
    "celery",
    "celeryev",
    "x.reply.celery.pidbox",
    "no-such-queue",
    "q" * 65,
    "gpu ",
    "gpu\n",
    "GPU",
]


@pytest.mark.parametrize("queue", REFUSED, ids=range(len(REFUSED)))
def test_queue_outside_the_configured_ones_is_a_400(project: ProjectCtx, chat_jsonl: str, queue: str) -> None:
    file_id = project.upload(chat_jsonl)
    before = project.client.get("/v1/fine_tuning/jobs", headers=project.headers).json()["data"]
    response = project.client.post(
        "/v1/fine_tuning/jobs",
        json={"model": MODEL, "training_file": file_id, "queue": queue},
        headers=project.headers,
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "queue" and error["code"] == "invalid_queue", error
    assert error["type"] == "invalid_request_error"
    assert "gpu" in error["message"]  # names what may be chosen
    after = project.client.get("/v1/fine_tuning/jobs", headers=project.headers).json()["data"]
    assert after == before  # nothing stored


@pytest.mark.parametrize("queue", [None, "gpu", "default", ""])
def test_default_queue_is_accepted(project: ProjectCtx, chat_jsonl: str, queue: str | None) -> None:
    file_id = project.upload(chat_jsonl)
    body = {"model": MODEL, "training_file": file_id} | ({} if queue is None else {"queue": queue})
    response = project.client.post("/v1/fine_tuning/jobs", json=body, headers=project.headers)
    assert response.status_code == 200, response.text


def test_allowed_queues_come_from_the_settings() -> None:
    settings = Settings(worker_classes="gpu=80,small=24", job_queues="a100, h100,,control,unacked")
    assert allowed_queues(settings) == {"gpu", "small", "a100", "h100"}
    assert check_queue("small", settings) == "small"
    assert check_queue("h100", settings) == "h100"
    assert check_queue(None, settings) == "gpu"
    with pytest.raises(UnknownQueue):
        check_queue("control", settings)
    with pytest.raises(UnknownQueue):
        check_queue("unacked", settings)


def test_a_stored_job_on_a_reserved_queue_is_never_sent_there() -> None:
    """Jobs stored before names were checked: the reconciler's re-send refuses them."""
    for queue in ("unacked", "control", "_kombu.binding.gpu"):
        with pytest.raises(UnknownQueue):
            queue_for(queue)
    assert queue_for("gpu") == "gpu"
