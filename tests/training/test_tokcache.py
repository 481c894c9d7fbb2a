"""The tokenization cache (tuneforge/training/tokcache.py): a second run on the same file takes
its measured data and TRL's prepared datasets from the cache, trains on the same token ids and
says so; a change that decides tokenization (max_seq_length) misses. Timings are not asserted
(tests do not time); the speed-up is measured by the worker test and the report."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.training.conftest import DATA, make_spec, train
from tuneforge.training import tokcache
from tuneforge.training.data import read_training_file
from tuneforge.training.loading import load_tokenizer


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[Path]:
    tokcache.configure(tmp_path / "tokcache")
    yield tmp_path / "tokcache"
    tokcache.configure(None)


@pytest.mark.slow
def test_a_second_run_on_the_same_file_hits(cache: Path, tiny_chat_path: Path, tmp_path: Path) -> None:
    spec = make_spec(max_steps=1, batch_size=4, max_seq_length=256)
    valid = tmp_path / "valid.jsonl"
    valid.write_text("".join((DATA / "qa.jsonl").read_text().splitlines(keepends=True)[:8]))
    first = train(spec, tiny_chat_path, DATA / "qa.jsonl", tmp_path / "one", valid_file=valid)
    assert tokcache.summary()["tokenization_cache"] == "miss"
    entries = sorted(p.name for p in cache.glob("*/*"))
    assert len([e for e in entries if e.endswith(tokcache.DATA_SUFFIX)]) == 2  # train, validation
    assert len([e for e in entries if e.endswith(tokcache.PREPARED_SUFFIX)]) == 2  # train, eval

    tokcache.configure(cache)  # a new process: nothing looked up yet
    second = train(spec, tiny_chat_path, DATA / "qa.jsonl", tmp_path / "two", valid_file=valid)
    assert tokcache.summary() == {
        "tokenization_cache": "hit",
        "tokenization_cache_entries": {
            "train.data": "hit",
            "validation.data": "hit",
            "train.prepared": "hit",
            "eval.prepared": "hit",
        },
    }
    assert first.result.report["data"] == second.result.report["data"]
    assert first.result.warnings == second.result.warnings
    assert first.result.metrics["train_loss"] == pytest.approx(second.result.metrics["train_loss"])


def test_the_key_names_what_decides_tokenization(cache: Path, tiny_chat_path: Path) -> None:
    tokenizer = load_tokenizer(tiny_chat_path)
    one = read_training_file(DATA / "qa.jsonl", "supervised", tokenizer, 256)
    assert tokcache.summary()["tokenization_cache"] == "miss"
    again = read_training_file(DATA / "qa.jsonl", "supervised", tokenizer, 256)
    assert tokcache.summary()["tokenization_cache"] == "hit"
    longer = read_training_file(DATA / "qa.jsonl", "supervised", tokenizer, 512)
    assert tokcache.summary()["tokenization_cache"] == "miss"
    assert one.cache_key == again.cache_key != longer.cache_key
    assert again.rows == one.rows and again.stats == one.stats
    pretraining = read_training_file(DATA / "corpus.jsonl", "pretraining", tokenizer, 256)
    assert pretraining.cache_key.file_sha256 != one.cache_key.file_sha256
