"""The object-key layout: built and parsed in one module, and nowhere else in the package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import tuneforge
from tuneforge.storage import keys
from tuneforge.storage.keys import CheckpointKeys


def test_layout() -> None:
    assert keys.file_key("file-abc") == "files/file-abc"
    assert keys.artifact_key("ftjob-1", "adapter") == "jobs/ftjob-1/artifacts/adapter.tar.gz"
    checkpoint = CheckpointKeys("ftjob-1", "ftckpt-2")
    assert checkpoint.adapter == "jobs/ftjob-1/checkpoints/ftckpt-2/adapter.tar.gz"
    assert checkpoint.state == "jobs/ftjob-1/checkpoints/ftckpt-2/state.tar.gz"
    assert checkpoint.prefix.startswith(keys.job_checkpoints_prefix("ftjob-1"))
    assert keys.job_checkpoints_prefix("ftjob-1").startswith(keys.job_prefix("ftjob-1"))


def test_checkpoint_keys_parse_back() -> None:
    checkpoint = CheckpointKeys("ftjob-1", "ftckpt-2")
    assert CheckpointKeys.parse(checkpoint.adapter) == checkpoint
    assert CheckpointKeys.parse(checkpoint.state) == checkpoint


@pytest.mark.parametrize(
    "key",
    [
        "files/file-abc",
        "jobs/ftjob-1/artifacts/adapter.tar.gz",
        "jobs/ftjob-1/checkpoints/ftckpt-2/other.bin",
        "jobs//checkpoints/ftckpt-2/adapter.tar.gz",
        "objects/jobs/ftjob-1/checkpoints/ftckpt-2/adapter.tar.gz",
    ],
)
def test_other_keys_are_not_checkpoints(key: str) -> None:
    with pytest.raises(ValueError):
        CheckpointKeys.parse(key)


def test_no_key_is_built_outside_the_keys_module() -> None:
    """No string literal or f-string in the package starts with a top-level key folder, except
    in tuneforge/storage/keys.py."""
    root = Path(tuneforge.__file__).parent
    found = []
    for path in root.rglob("*.py"):
        if path == Path(keys.__file__):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            first = node.values[0] if isinstance(node, ast.JoinedStr) and node.values else node
            if (
                isinstance(first, ast.Constant)
                and isinstance(first.value, str)
                and first.value.startswith((keys.FILES, keys.JOBS))
            ):
                found.append(f"{path.relative_to(root)}:{node.lineno}")  # type: ignore[attr-defined]
    assert found == []
