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


#: A 1.1B Llama (TinyLlama's shape): full fine-tuning needs about 10 GiB on one device; quick to build.
LLAMA_1B = {
    **LLAMA_31_8B,
    "vocab_size": 32000,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
}


@pytest.fixture(scope="module")
def unbudgeted_client(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[TestClient]:
    """The app without a time budget for model builds: the first build of a config on a loaded
    machine can take longer than the default 15 s, which is a 400 and not what is tested here."""
    from tuneforge.api.app import create_app

    data_dir = tmp_path_factory.mktemp("estimates-api-unbudgeted")
    url = f"sqlite:///{data_dir / 'tuneforge.db'}"
    migrate(url)
    settings = Settings(data_dir=data_dir, database_url=url, admin_key=ADMIN_KEY, estimate_build_seconds=0)
    app = create_app(settings)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client
    app.state.engine.dispose()


def test_fits_is_judged_per_device_under_ddp_and_fsdp(unbudgeted_client: TestClient) -> None:
    """Full fine-tuning of a 1.1B model needs about 10 GiB on one device: one 8 GiB device is too
    small, and so is each of 4 under DDP (a whole replica on each, only the activations split);
    under FSDP each of 4 holds a quarter of the weights, gradients and optimizer state, and it
    fits. `auto` is FSDP for full fine-tuning and DDP for an adapter."""
    body = {
        "model_config": LLAMA_1B,
        "adapter": {"type": "full"},
        "hyperparameters": {"batch_size": 8, "max_seq_length": 512},
        "gradient_checkpointing": True,
        "n_tokens": 1_000_000,
    }

    def on(**hardware: Any) -> dict[str, Any]:
        response = _post(unbudgeted_client, {**body, "hardware": {"gpu_memory_gb": 8, **hardware}})
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    one, ddp, fsdp, auto = on(), on(count=4, strategy="ddp"), on(count=4, strategy="fsdp"), on(count=4)
    assert (one["fits"], ddp["fits"], fsdp["fits"], auto["fits"]) == (False, False, True, True)
    device = one["device_memory_bytes"]
    assert fsdp["memory"]["total"] < device < ddp["memory"]["total"] < one["memory"]["total"]
    for part in ("weights", "gradients", "optimizer"):
        assert ddp["memory"][part] == one["memory"][part]
    for part in ("gradients", "optimizer"):
        assert fsdp["memory"][part] == -(-one["memory"][part] // 4)
    assert ddp["memory"]["activations"] == fsdp["memory"]["activations"] < one["memory"]["activations"]
    assert auto["memory"] == fsdp["memory"]
    assert any("sharded over 4 devices" in note for note in fsdp["memory_notes"])
    assert any("replica on each of 4 devices" in note for note in ddp["memory_notes"])
    lora = {**body, "adapter": {"type": "lora"}}
    answers = [
        _post(unbudgeted_client, {**lora, "hardware": {"gpu_memory_gb": 8, "count": 4, **extra}}).json()
        for extra in ({}, {"strategy": "ddp"})
    ]
    assert answers[0]["memory"] == answers[1]["memory"]


@pytest.mark.parametrize(
    ("hardware", "param"),
    [
        ({"gpu": "a100-80gb", "count": 0}, "hardware.count"),
        ({"gpu": "a100-80gb", "count": 2.5}, "hardware.count"),
        ({"gpu": "a100-80gb", "strategy": "tp"}, "hardware.strategy"),
    ],
)
def test_bad_device_count_or_strategy_is_a_400(
    client: TestClient, hardware: dict[str, Any], param: str
) -> None:
    response = _post(client, {"model_config": LLAMA_31_8B, "hardware": hardware})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
