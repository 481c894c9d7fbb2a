"""Estimates of different configs do not wait for each other: a build in progress for one
`model_config` blocks neither another config's estimate nor another project's job creation; the
same config is built once however many ask at once; a build past its time budget and a config
past the size limits are 400s naming the field."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.estimates.test_estimates import LLAMA_31_8B, QWEN2_SMALL
from tests.support.api import new_project
from tuneforge.config import Settings, get_settings
from tuneforge.db import migrate
from tuneforge.estimates import skeleton

ADMIN_KEY = "tf-admin-estimates-concurrency-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
SLOW = {**QWEN2_SMALL, "num_hidden_layers": 5}  # the config whose build the test holds up
#: Bound on the answers that must not wait for the held build (they take well under a second).
GENEROUS = 120


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[TestClient]:
    """An app on SQLite whose job messages go to kombu's in-memory transport (no worker here)."""
    from tuneforge.api.app import create_app

    previous = os.environ.get("TUNEFORGE_BROKER_URL")
    os.environ["TUNEFORGE_BROKER_URL"] = "memory://"
    get_settings.cache_clear()
    data_dir = tmp_path_factory.mktemp("estimates-concurrency")
    url = f"sqlite:///{data_dir / 'tuneforge.db'}"
    migrate(url)
    settings = Settings(
        data_dir=data_dir,
        database_url=url,
        admin_key=ADMIN_KEY,  # type: ignore[arg-type]
        broker_url="memory://",
    )
    app = create_app(settings)
    try:
        with TestClient(app, raise_server_exceptions=False) as test_client:
            yield test_client
    finally:
        app.state.engine.dispose()
        if previous is None:
            os.environ.pop("TUNEFORGE_BROKER_URL", None)
        else:
            os.environ["TUNEFORGE_BROKER_URL"] = previous
        get_settings.cache_clear()


@pytest.fixture
def held_build(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[threading.Event, threading.Event]]:
    """Holds the skeleton build of SLOW (and only it) until `release` is set; `started` says it
    is in progress."""
    skeleton.clear_cache()
    started, release = threading.Event(), threading.Event()
    real = skeleton._build_meta

    def build_meta(config: Any) -> Any:
        if config.num_hidden_layers == SLOW["num_hidden_layers"]:
            started.set()
            assert release.wait(timeout=300)
        return real(config)

    monkeypatch.setattr(skeleton, "_build_meta", build_meta)
    yield started, release
    release.set()
    skeleton.clear_cache()


@contextmanager
def _app(client: TestClient, **update: Any) -> Iterator[TestClient]:
    """Another app on the module's database, with some settings changed."""
    from tuneforge.api.app import create_app

    app = create_app(client.app.state.settings.model_copy(update=update))  # type: ignore[attr-defined]
    try:
        with TestClient(app, raise_server_exceptions=False) as other:
            yield other
    finally:
        app.state.engine.dispose()
        skeleton.build_slots.limit = client.app.state.settings.estimate_concurrent_builds  # type: ignore[attr-defined]


def _post_estimate(client: TestClient, body: dict[str, Any], out: dict[str, Any]) -> None:
    out["response"] = client.post("/v1/fine_tuning/estimates", json=body, headers=AUTH)


def test_a_slow_build_blocks_no_other_config_or_job_creation(
    client: TestClient, held_build: tuple[threading.Event, threading.Event], qa_path: Path
) -> None:
    started, release = held_build
    slow: dict[str, Any] = {}
    thread = threading.Thread(target=_post_estimate, args=(client, {"model_config": SLOW}, slow))
    thread.start()
    try:
        assert started.wait(timeout=GENEROUS)

        done: dict[str, Any] = {}
        other = threading.Thread(target=_post_estimate, args=(client, {"model_config": QWEN2_SMALL}, done))
        other.start()
        other.join(timeout=GENEROUS)
        assert "response" in done, "another config's estimate waited for the held build"
        assert done["response"].status_code == 200, done["response"].text

        project = new_project(client, "other-tenant", admin_key=ADMIN_KEY)
        file_id = project.upload(qa_path.read_text())
        created: dict[str, Any] = {}

        def create_job() -> None:
            created["job"] = project.openai.fine_tuning.jobs.create(
                model="tuneforge/tiny-chat", training_file=file_id
            )

        creator = threading.Thread(target=create_job)
        creator.start()
        creator.join(timeout=GENEROUS)
        assert "job" in created, "another project's job creation waited for the held build"
        assert started.is_set() and not release.is_set() and thread.is_alive()  # still held
    finally:
        release.set()
        thread.join(timeout=GENEROUS)
    assert slow["response"].status_code == 200, slow["response"].text


def test_the_same_config_is_built_once_for_concurrent_callers(
    client: TestClient, held_build: tuple[threading.Event, threading.Event], monkeypatch: pytest.MonkeyPatch
) -> None:
    started, release = held_build
    builds: list[str] = []
    real = skeleton._build_shape

    def counting(key: str, param: str) -> Any:
        builds.append(key)
        return real(key, param)

    monkeypatch.setattr(skeleton, "_build_shape", counting)
    results: list[dict[str, Any]] = [{} for _ in range(4)]
    with _app(client, estimate_concurrent_builds=4) as roomy:
        threads = [
            threading.Thread(target=_post_estimate, args=(roomy, {"model_config": SLOW}, out))
            for out in results
        ]
        for thread in threads:
            thread.start()
        assert started.wait(timeout=GENEROUS)
        release.set()
        for thread in threads:
            thread.join(timeout=GENEROUS)
    assert [r["response"].status_code for r in results] == [200] * 4
    assert len(builds) == 1


def test_a_build_past_its_budget_is_a_400(client: TestClient) -> None:
    skeleton.clear_cache()
    try:
        shape = skeleton.model_shape  # the app passes TUNEFORGE_ESTIMATE_BUILD_SECONDS; call directly
        with pytest.raises(skeleton.BuildTimeout) as caught:
            shape({**LLAMA_31_8B, "num_hidden_layers": 200}, "model_config", 0.05)
        assert caught.value.param == "model_config"
        assert (
            skeleton.model_shape({**LLAMA_31_8B, "num_hidden_layers": 2}, "model_config", 60).num_layers == 2
        )
    finally:
        skeleton.clear_cache()


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"num_hidden_layers": 512}, "model_config.num_hidden_layers"),
        ({"num_attention_heads": 33}, "model_config.num_attention_heads"),
        ({"head_dim": 0}, "model_config.head_dim"),
        ({"num_key_value_heads": 0}, "model_config.num_key_value_heads"),
        ({"num_key_value_heads": 7}, "model_config.num_key_value_heads"),
        ({"rope_scaling": {"type": "bogus", "factor": 2.0}}, "model_config.rope_scaling.type"),
        ({"rope_scaling": {"rope_type": "bogus", "factor": 2.0}}, "model_config.rope_scaling.rope_type"),
    ],
)
def test_bad_model_configs_are_400s_naming_the_field(
    client: TestClient, change: dict[str, Any], param: str
) -> None:
    body = {"model_config": {**LLAMA_31_8B, "num_hidden_layers": 2, **change}}
    response = client.post("/v1/fine_tuning/estimates", json=body, headers=AUTH)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "tuneforge/tiny-chat", "n_tokens": 10**400}, "n_tokens"),
        ({"model": "tuneforge/tiny-chat", "n_examples": 10**30}, "n_examples"),
        ({"model_config": {"model_type": "llama", "x": [[[[[[[[[[1]]]]]]]]]]}}, "model_config"),
        ({"model_config": {**LLAMA_31_8B, "pad": "x" * 100_000}}, "model_config"),
    ],
)
def test_out_of_range_estimate_inputs_are_400s(client: TestClient, body: dict[str, Any], param: str) -> None:
    response = client.post("/v1/fine_tuning/estimates", json=body, headers=AUTH)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_infinite_n_tokens_is_a_400(client: TestClient) -> None:
    response = client.post(
        "/v1/fine_tuning/estimates",
        content=b'{"model": "tuneforge/tiny-chat", "n_tokens": 1e400}',
        headers={**AUTH, "content-type": "application/json"},
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "n_tokens"


def test_an_estimate_past_the_services_budget_is_a_400(client: TestClient) -> None:
    """The budget covers every build one estimate makes (the skeleton, the adapter, the advisor's
    variants); the next request gets a budget of its own."""
    body = {"model_config": {**LLAMA_31_8B, "num_hidden_layers": 40}, "hardware": {"gpu": "l4"}}
    try:
        with _app(client, estimate_build_seconds=0.01) as tight:
            for _ in range(2):
                response = tight.post("/v1/fine_tuning/estimates", json=body, headers=AUTH)
                assert response.status_code == 400, response.text
                assert response.json()["error"]["param"] == "model_config"
                assert "budget" in response.json()["error"]["message"]
        assert client.post("/v1/fine_tuning/estimates", json=body, headers=AUTH).status_code == 200
    finally:
        skeleton.clear_cache()


def test_past_the_build_slots_new_configs_wait_outside_and_cached_ones_answer(
    client: TestClient, held_build: tuple[threading.Event, threading.Event]
) -> None:
    """With one build slot and a build in progress, a new config is a 503 with Retry-After (no
    API thread waits on it); a config built before answers from the cache."""
    started, release = held_build
    with _app(client, estimate_concurrent_builds=1) as narrow:
        cached = {"model_config": QWEN2_SMALL}
        assert narrow.post("/v1/fine_tuning/estimates", json=cached, headers=AUTH).status_code == 200
        slow: dict[str, Any] = {}
        thread = threading.Thread(target=_post_estimate, args=(narrow, {"model_config": SLOW}, slow))
        thread.start()
        try:
            assert started.wait(timeout=GENEROUS)
            other = {"model_config": {**QWEN2_SMALL, "num_hidden_layers": 4}}
            busy = narrow.post("/v1/fine_tuning/estimates", json=other, headers=AUTH)
            assert busy.status_code == 503, busy.text
            assert busy.json()["error"]["code"] == "estimates_busy"
            assert int(busy.headers["retry-after"]) > 0
            assert narrow.post("/v1/fine_tuning/estimates", json=cached, headers=AUTH).status_code == 200
        finally:
            release.set()
            thread.join(timeout=GENEROUS)
        assert slow["response"].status_code == 200, slow["response"].text
