"""GET /metrics on the API (no key): Prometheus' text format, requests by route template (never
an id), jobs by status and queue depth from the database; and `integrations` refused at creation
when the service has not configured them."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from openai import BadRequestError
from prometheus_client.parser import text_string_to_metric_families

from tests.support.api import ProjectCtx

MODEL = "tuneforge/tiny-chat"


def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    answer = client.get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_parse_and_move_with_requests_and_jobs(project: ProjectCtx, chat_jsonl: str) -> None:
    client = project.client
    before = scrape(client)
    file_id = project.upload(chat_jsonl)
    job = project.openai.fine_tuning.jobs.create(model=MODEL, training_file=file_id)
    project.openai.fine_tuning.jobs.retrieve(job.id)
    assert client.get(f"/v1/fine_tuning/jobs/{job.id}-nope", headers=project.headers).status_code == 404
    after = scrape(client)

    route = "/v1/fine_tuning/jobs/{fine_tuning_job_id}"
    assert value(
        after, "tuneforge_http_requests_total", method="GET", route=route, status="200"
    ) >= 1 + value(before, "tuneforge_http_requests_total", method="GET", route=route, status="200")
    assert value(after, "tuneforge_http_requests_total", method="GET", route=route, status="404") >= 1
    assert (
        value(after, "tuneforge_http_request_duration_seconds_count", method="POST", route="/v1/files") >= 1
    )
    assert value(after, "tuneforge_jobs", status="validating_files") == 1 + value(
        before, "tuneforge_jobs", status="validating_files"
    )
    assert value(after, "tuneforge_queue_depth", queue="gpu") == 1 + value(
        before, "tuneforge_queue_depth", queue="gpu"
    )
    assert ("tuneforge_jobs", (("status", "paused"),)) in after  # every status, 0 included
    labels = " ".join(str(key) for key in after)
    assert job.id not in labels and file_id not in labels and project.id not in labels


def test_an_unknown_path_is_one_series(client: TestClient) -> None:
    for n in range(3):
        assert client.get(f"/no/such/path/{n}").status_code == 404
    samples = scrape(client)
    assert value(samples, "tuneforge_http_requests_total", method="GET", route="unmatched", status="404") >= 3
    assert not any("/no/such" in str(key) for key in samples)


@pytest.mark.parametrize(
    ("integrations", "param"),
    [
        ([{"type": "wandb", "wandb": {"project": "p"}}], "integrations[0].type"),
        (
            [{"type": "tensorboard"}, {"type": "mlflow", "mlflow": {"experiment": "e"}}],
            "integrations[1].type",
        ),
        ([{"type": "comet"}], "integrations[0].type"),
        ([{"type": "wandb", "wandb": {"project": "p", "api_key": "x"}}], "integrations[0].wandb.api_key"),
        ([{"type": "mlflow", "mlflow": {"experiment": "e", "tracking_uri": "file:///etc"}}], None),
    ],
)
def test_integrations_the_service_has_not_configured_are_refused(
    project: ProjectCtx, chat_jsonl: str, integrations: list[dict[str, object]], param: str | None
) -> None:
    file_id = project.upload(chat_jsonl)
    with pytest.raises(BadRequestError) as refused:
        project.openai.fine_tuning.jobs.create(
            model=MODEL, training_file=file_id, extra_body={"integrations": integrations}
        )
    assert refused.value.status_code == 400
    body = refused.value.body
    assert isinstance(body, dict)
    assert body["param"] == param or (param is None and str(body["param"]).startswith("integrations[0]"))


def test_tensorboard_is_accepted_and_echoed(project: ProjectCtx, chat_jsonl: str) -> None:
    file_id = project.upload(chat_jsonl)
    job = project.openai.fine_tuning.jobs.create(
        model=MODEL,
        training_file=file_id,
        extra_body={"integrations": [{"type": "tensorboard"}]},
    )
    assert job.integrations is not None and job.integrations[0].type == "tensorboard"
