"""`tuneforge estimate` prints a readable table, or JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.estimates.test_estimates import LLAMA_31_8B
from tuneforge.cli import main


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA_31_8B))
    return path


def test_estimate_table(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["estimate", "--model-config", str(config_file), "--adapter", "lora", "--r", "16"]
    assert main([*argv, "--target-modules", "q_proj,v_proj", "--gpu-memory-gb", "24"]) == 0
    out = capsys.readouterr().out
    assert "6,815,744" in out
    assert "8,037,076,992" in out
    assert "memory: total" in out
    assert "fits" in out


def test_estimate_json(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["estimate", "--model-config", str(config_file), "--r", "8", "--target-modules", "all-linear"]
    assert main([*argv, "--seq-len", "512", "--batch-size", "2", "--n-tokens", "100000", "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["trainable_params"] == 20_971_520
    assert body["tokens_per_epoch"] == 100_000
    assert body["estimated_seconds"] is None


def test_estimate_bad_target_names_the_field(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["estimate", "--model-config", str(config_file), "--target-modules", "attn"]) == 2
    err = capsys.readouterr().err
    assert "adapter.target_modules" in err
    assert "q_proj" in err
