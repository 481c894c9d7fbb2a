"""Base models on offer: the bundled tiny-chat, those named by `TUNEFORGE_MODELS`, and causal LMs
already in the local Hugging Face cache. Nothing is ever downloaded."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from tuneforge.training import tiny_chat


class UnknownModel(LookupError):
    """The model id is not on offer here."""


@dataclass(frozen=True)
class BaseModelEntry:
    id: str
    source: str  # "bundled", "configured" or "hf-cache"
    path: Path | None  # None until built (tiny-chat)
    created: int = 0


def _parse_configured(models: str) -> list[tuple[str, Path]]:
    entries = []
    for item in filter(None, (part.strip() for part in models.split(","))):
        model_id, sep, path = item.partition("=")
        if not sep or not model_id.strip() or not path.strip():
            raise ValueError(f"TUNEFORGE_MODELS entry {item!r} is not of the form id=/path")
        entries.append((model_id.strip(), Path(path.strip()).expanduser()))
    return entries


def _hf_cache_dir() -> Path:
    if "HF_HUB_CACHE" in os.environ:
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"


def _is_causal_lm(model_dir: Path) -> bool:
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return any(str(a).endswith("ForCausalLM") for a in config.get("architectures") or [])


def _cached_models() -> list[BaseModelEntry]:
    found: list[BaseModelEntry] = []
    cache = _hf_cache_dir()
    if not cache.is_dir():
        return found
    for repo in sorted(cache.glob("models--*")):
        ref = repo / "refs" / "main"
        snapshots = sorted((repo / "snapshots").glob("*"))
        snapshot = (repo / "snapshots" / ref.read_text().strip()) if ref.is_file() else None
        if snapshot is None or not snapshot.is_dir():
            snapshot = snapshots[-1] if snapshots else None
        if snapshot is not None and _is_causal_lm(snapshot):
            model_id = repo.name.removeprefix("models--").replace("--", "/")
            found.append(BaseModelEntry(model_id, "hf-cache", snapshot, int(snapshot.stat().st_mtime)))
    return found


def list_base_models(models: str, models_dir: Path) -> list[BaseModelEntry]:
    """Every base model on offer, bundled first, each id once."""
    built = models_dir / "tuneforge--tiny-chat"
    entries = [BaseModelEntry(tiny_chat.MODEL_ID, "bundled", built if built.is_dir() else None)]
    entries += [BaseModelEntry(i, "configured", p) for i, p in _parse_configured(models)]
    entries += _cached_models()
    seen: set[str] = set()
    return [e for e in entries if not (e.id in seen or seen.add(e.id))]  # type: ignore[func-returns-value]


def find_base_model(model_id: str, models: str, models_dir: Path) -> BaseModelEntry:
    for entry in list_base_models(models, models_dir):
        if entry.id == model_id:
            return entry
    raise UnknownModel(model_id)


def resolve_model_path(model_id: str, models: str, models_dir: Path) -> Path:
    """The local directory of a base model, building tiny-chat first if needed."""
    entry = find_base_model(model_id, models, models_dir)
    if entry.id == tiny_chat.MODEL_ID:
        return tiny_chat.build_tiny_chat(models_dir)
    assert entry.path is not None
    return entry.path
