"""The tokenization cache: a file's measured data (rows, statistics, warnings) and the datasets
TRL prepared from it (tokenized, labelled, truncated or packed) kept for the next reader.

An entry is keyed by what decides its content: the file's sha256, the tokenizer (a fingerprint of
its whole definition), the chat template, `max_seq_length`, the method and the file's format; a
prepared dataset's key adds TRL's preparation options. The run only sees a local directory
(`configure`), laid out `{file sha256}/{entry}`, one file per entry, each written whole (a
temporary name, then a rename). The worker fills it from the object store before the run and
stores what the run added (tuneforge/worker/tokstore.py), so validation, training, a resumed
attempt and a later job on the same file share the work. A training process runs one job, so
what it looked up is kept here for the start event (`summary`).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import shutil
import tarfile
import tempfile
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase, Trainer

    from tuneforge.training.data import TrainingData

log = logging.getLogger(__name__)

VERSION = 1  # of the entries' layout; part of every key
DATA_SUFFIX = ".data.json.gz"
PREPARED_SUFFIX = ".prepared.tar"

_directory: Path | None = None
_lookups: dict[str, str] = {}  # "train.data" -> "hit" | "miss", in the order they happened


def configure(directory: Path | None) -> None:
    """Where this process reads and writes entries; None turns the cache off."""
    global _directory
    _directory = directory
    _lookups.clear()
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)


def summary() -> dict[str, Any]:
    """For the start event: `tokenization_cache` is "hit" when everything tokenized came from the
    cache, "miss" when nothing did, "partial" in between; absent when no cache was configured."""
    if _directory is None or not _lookups:
        return {}
    found = set(_lookups.values())
    overall = "hit" if found == {"hit"} else "miss" if found == {"miss"} else "partial"
    return {"tokenization_cache": overall, "tokenization_cache_entries": dict(_lookups)}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A digest of everything that decides token ids: the tokenizer's full definition (vocabulary,
    merges, normalizer, pre-tokenizer, post-processor, added tokens) and its special tokens."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        for runtime in ("padding", "truncation"):  # how batches are shaped, not the ids
            definition.pop(runtime, None)
        digest.update(json.dumps(definition, sort_keys=True).encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    # The pad token is left out: trainers set it (to EOS) after validation measured the file.
    special = {k: v for k, v in tokenizer.special_tokens_map.items() if k != "pad_token"}
    digest.update(json.dumps(special, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _digest(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class DataKey:
    """Where one file's entries live and what names its measured-data entry."""

    file_sha256: str
    digest: str
    split: str  # "train" or "validation": names the lookup in `summary`

    @property
    def folder(self) -> Path:
        assert _directory is not None
        return _directory / self.file_sha256


def data_key(
    path: Path, tokenizer: PreTrainedTokenizerBase, max_seq_length: int, method: str, fmt: str, split: str
) -> DataKey | None:
    """The key of `path` read for `method`, or None when no cache is configured."""
    if _directory is None:
        return None
    sha = file_sha256(path)
    fields = {
        "version": VERSION,
        "file_sha256": sha,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "chat_template": hashlib.sha256(str(tokenizer.chat_template or "").encode()).hexdigest(),
        "max_seq_length": max_seq_length,
        "method": method,
        "format": fmt,
    }
    return DataKey(sha, _digest(fields), split)


def _write_whole(target: Path, write: Callable[[Path], None]) -> None:
    """Writes `target` under a temporary name in its folder, then renames it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def cached_training_data(key: DataKey | None, read: Callable[[], TrainingData]) -> TrainingData:
    """The measured data of `key` from the cache, or `read()` stored under it."""
    from tuneforge.training.data import DataStats, TrainingData

    if key is None:
        return read()
    entry = key.folder / f"{key.digest}{DATA_SUFFIX}"
    lookup = f"{key.split}.data"
    if entry.is_file():
        try:
            raw = json.loads(gzip.decompress(entry.read_bytes()))
            data = TrainingData(
                kind=raw["kind"],
                rows=raw["rows"],
                stats=DataStats(**raw["stats"]),
                warnings=Counter(raw["warnings"]),
            )
            data.cache_key = key
            _lookups[lookup] = "hit"
            return data
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.warning("tokenization cache: unreadable entry %s (%s); reading the file", entry.name, error)
    data = read()
    payload = {
        "kind": data.kind,
        "rows": data.rows,
        "stats": {
            "format": data.stats.format,
            "examples": data.stats.examples,
            "tokens": data.stats.tokens,
            "trained_tokens": data.stats.trained_tokens,
            "min_tokens": data.stats.min_tokens,
            "max_tokens": data.stats.max_tokens,
        },
        "warnings": dict(data.warnings),
    }
    blob = gzip.compress(json.dumps(payload, default=str).encode(), compresslevel=1)

    def write(tmp: Path) -> None:
        tmp.write_bytes(blob)

    _write_whole(entry, write)
    data.cache_key = key
    _lookups[lookup] = "miss"
    return data


# TRL's options that change what its preparation makes of a dataset.
_PREPARATION_ARGS = (
    "packing",
    "packing_strategy",
    "eval_packing",
    "padding_free",
    "max_length",
    "truncation_mode",
    "assistant_only_loss",
    "completion_only_loss",
    "dataset_text_field",
    "chat_template_path",
    "eos_token",
    "pad_token",
)


def _prepared_entry(data: TrainingData, role: str, args: Any) -> Path | None:
    key = data.cache_key
    if not isinstance(key, DataKey) or _directory is None:
        return None
    import trl

    fields = {name: getattr(args, name, None) for name in _PREPARATION_ARGS}
    fields |= {"data": key.digest, "role": role, "trl": trl.__version__}
    return key.folder / f"{key.digest}-{_digest(fields)}{PREPARED_SUFFIX}"


def _load_prepared(entry: Path) -> Dataset:
    from datasets import load_from_disk

    assert _directory is not None
    target = _directory / ".extracted" / entry.name
    if not target.is_dir():
        # extracted aside, then renamed into place: the ranks of a multi-device run read the same
        # entry at once, and one extracting into the other's half-written directory failed
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{entry.name}."))
        with tarfile.open(entry) as archive:
            archive.extractall(scratch, filter="data")
        try:
            scratch.rename(target)
        except OSError:  # another process put it there first
            shutil.rmtree(scratch, ignore_errors=True)
    dataset: Dataset = load_from_disk(str(target))
    return dataset


def _save_prepared(dataset: Dataset, entry: Path) -> None:
    with tempfile.TemporaryDirectory(dir=entry.parent) as scratch:
        dataset.save_to_disk(scratch)

        def write(tmp: Path) -> None:
            with tarfile.open(tmp, "w") as archive:
                for item in sorted(Path(scratch).iterdir()):
                    archive.add(item, arcname=item.name)

        _write_whole(entry, write)


def sft_trainer(
    trainer_class: type[Trainer],
    *,
    args: Any,
    train_data: TrainingData,
    valid_data: TrainingData | None,
    **kwargs: Any,
) -> Trainer:
    """TRL's SFTTrainer on the datasets it prepared for an earlier run (`skip_prepare_dataset`)
    when the cache has them; otherwise as usual, its prepared datasets then kept for the next."""
    roles = {"train": train_data, **({"eval": valid_data} if valid_data is not None else {})}
    entries = {role: _prepared_entry(data, role, args) for role, data in roles.items()}
    usable = {role: entry for role, entry in entries.items() if entry is not None}
    if usable and len(usable) == len(entries) and all(entry.is_file() for entry in usable.values()):
        try:
            prepared = {role: _load_prepared(entry) for role, entry in usable.items()}
        except Exception as error:  # a damaged entry costs a tokenization, never the job
            log.warning("tokenization cache: unreadable prepared dataset (%s); preparing again", error)
        else:
            args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}
            trainer = trainer_class(
                args=args, train_dataset=prepared["train"], eval_dataset=prepared.get("eval"), **kwargs
            )
            for role in usable:
                _lookups[f"{role}.prepared"] = "hit"
            return trainer
    trainer = trainer_class(
        args=args,
        train_dataset=train_data.dataset(),
        eval_dataset=valid_data.dataset() if valid_data is not None else None,
        **kwargs,
    )
    made: dict[str, Any] = {"train": trainer.train_dataset, "eval": trainer.eval_dataset}
    for role, entry in usable.items():
        try:
            _save_prepared(made[role], entry)
            _lookups[f"{role}.prepared"] = "miss"
        except Exception as error:
            log.warning("tokenization cache: could not keep the prepared %s dataset (%s)", role, error)
    return trainer
