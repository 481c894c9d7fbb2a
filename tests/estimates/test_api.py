"""POST /v1/fine_tuning/estimates through the real app on a migrated SQLite database."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.estimates.test_estimates import LLAMA_31_8B
from tuneforge.config import Settings
from tuneforge.db import migrate

ADMIN_KEY = "tf-admin-estimates-test-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[TestClient]:
    from tuneforge.api.app import create_app

    data_dir = tmp_path_factory.mktemp("estimates-api")
    url = f"sqlite:///{data_dir / 'tuneforge.db'}"
    migrate(url)
    settings = Settings(data_dir=data_dir, database_url=url, admin_key=ADMIN_KEY)  # type: ignore[arg-type]
    app = create_app(settings)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client
    app.state.engine.dispose()


def _post(client: TestClient, body: dict[str, Any], headers: dict[str, str] = AUTH) -> Any:
    return client.post("/v1/fine_tuning/estimates", json=body, headers=headers)


def test_llama_8b_estimate(client: TestClient) -> None:
    body = {
        "model_config": LLAMA_31_8B,
        "adapter": {"type": "lora", "r": 16, "target_modules": ["q_proj", "v_proj"]},
        "method": {"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 2}}},
        "hardware": {"gpu": "a100-80gb"},
        "n_tokens": 1_000_000,
    }
    response = _post(client, body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["trainable_params"] == 6_815_744
    assert result["total_params"] == 8_037_076_992
    assert set(result["memory"]) == {"weights", "gradients", "optimizer", "activations", "total"}
    assert result["batch_size"] == 2
    assert result["tokens_per_epoch"] == 1_000_000
    assert result["estimated_seconds"] is None
    assert result["fits"] is True
    assert result["recommendation"]["reasons"]


def test_needs_a_key(client: TestClient) -> None:
    assert _post(client, {"model": "tuneforge/tiny-chat"}, headers={}).status_code == 401


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"model_config": {**LLAMA_31_8B, "model_type": "nope"}}, "model_config.model_type", ["nope"]),
        (
            {"model_config": {k: v for k, v in LLAMA_31_8B.items() if k != "num_hidden_layers"}},
            "model_config.num_hidden_layers",
            ["num_hidden_layers"],
        ),
        ({"model_config": LLAMA_31_8B, "adapter": {"r": 0}}, "adapter.r", []),
        ({"model_config": LLAMA_31_8B, "adapter": {"r": -4}}, "adapter.r", []),
        (
            {"model_config": LLAMA_31_8B, "adapter": {"target_modules": ["query"]}},
            "adapter.target_modules",
            ["q_proj", "down_proj", "lm_head"],
        ),
        ({"model": "nobody/nothing"}, "model", ["nobody/nothing"]),
        ({"model": "tuneforge/tiny-chat", "training_file": "file-missing"}, "training_file", []),
        ({"model_config": LLAMA_31_8B, "hardware": {"gpu": "abacus"}}, "hardware.gpu", ["a100-80gb"]),
    ],
)
def test_bad_input_is_400_naming_the_field(
    client: TestClient, body: dict[str, Any], param: str, words: list[str]
) -> None:
    response = _post(client, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    for word in words:
        assert word in error["message"]


def test_training_file_counts_are_used(client: TestClient, qa_path: Path) -> None:
    upload = client.post(
        "/v1/files",
        headers=AUTH,
        files={"file": ("qa.jsonl", qa_path.read_bytes())},
        data={"purpose": "fine-tune"},
    )
    assert upload.status_code == 200, upload.text
    row = upload.json()
    response = _post(
        client, {"model": "tuneforge/tiny-chat", "training_file": row["id"], "hardware": {"gpu": "cpu"}}
    )
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["tokens_per_epoch"] and result["tokens_per_epoch"] > 0
    assert result["steps"] == 4 * 8  # 32 examples: the recipe's auto rules give 4 epochs of batch 4
    assert result["recommendation"]["adapter"] == "prompt_tuning"  # 32 examples is few
    # tiny-chat on CPU is a measured throughput: a time, and where its figure comes from
    assert result["estimated_seconds"] > 0
    assert "estimate_bench.py" in result["throughput"]["source"]
