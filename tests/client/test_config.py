"""The client's configuration order and how `jobs create` builds its body (no service needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneforge.cli import build_parser
from tuneforge.client.api import Api, ClientError, Config
from tuneforge.client.commands import _job_body


def test_flags_then_tuneforge_then_openai_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TUNEFORGE_API_URL", "TUNEFORGE_API_KEY", "OPENAI_BASE_URL", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ClientError, match="no API key"):
        Config.resolve()
    monkeypatch.setenv("OPENAI_BASE_URL", "http://openai.example/v1/")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    assert Config.resolve() == Config("http://openai.example/v1", "sk-openai")
    monkeypatch.setenv("TUNEFORGE_API_URL", "http://tf.example/v1")
    monkeypatch.setenv("TUNEFORGE_API_KEY", "tf-key")
    assert Config.resolve() == Config("http://tf.example/v1", "tf-key")
    assert Config.resolve("http://flag/v1", "flag-key") == Config("http://flag/v1", "flag-key")


def test_create_flags_override_the_spec(tmp_path: Path) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "model": "tuneforge/tiny-chat",
                "training_file": "file-abc",
                "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3}}},
                "adapter": {"type": "lora", "r": 8},
                "metadata": {"team": "a"},
            }
        )
    )
    args = build_parser().parse_args(
        [
            *("jobs", "create", "--spec", str(spec), "--n-epochs", "5", "--learning-rate", "0.001"),
            *("--r", "16", "--export", "merged,gguf", "--metadata", "run=7", "--suffix", "x"),
        ]
    )
    with Api(Config("http://unused/v1", "k")) as api:
        body = _job_body(api, args)
    assert body == {
        "model": "tuneforge/tiny-chat",
        "training_file": "file-abc",
        "suffix": "x",
        "method": {
            "type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": 5, "learning_rate": 0.001}},
        },
        "adapter": {"type": "lora", "r": 16},
        "export": ["merged", "gguf"],
        "metadata": {"team": "a", "run": "7"},
    }
    missing = build_parser().parse_args(["jobs", "create", "--model", "tuneforge/tiny-chat"])
    with Api(Config("http://unused/v1", "k")) as api, pytest.raises(ClientError, match="--training-file"):
        _job_body(api, missing)
