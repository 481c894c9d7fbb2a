"""What a finished run leaves behind: the PEFT adapter (or full weights), a merged model when asked,
and a README model card. Every saved config names the base by its model id, never a machine path."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneforge.training import distributed
from tuneforge.training.loading import Device, load_model

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MERGEABLE = frozenset({"lora", "dora", "qlora", "ia3"})


def name_base_model(model: Any, model_id: str) -> None:
    """Records the model id (not the local directory) wherever PEFT and transformers save it."""
    for config in getattr(model, "peft_config", {}).values():
        config.base_model_name_or_path = model_id
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.config._name_or_path = model_id
    base.name_or_path = model_id


def fix_adapter_config(adapter_dir: Path, model_id: str) -> None:
    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = model_id
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_adapter(model: Any, tokenizer: PreTrainedTokenizerBase, out: Path, model_id: str, card: str) -> Path:
    with warnings.catch_warnings():
        # PEFT looks for the base's config under the model id to check the vocabulary; the id is not
        # a local path, and the vocabulary is never modified here.
        warnings.filterwarnings("ignore", message="Could not find a config file")
        # Only the trained adapter: a continued DPO run also holds TRL's frozen "ref" copy.
        model.save_pretrained(out, safe_serialization=True, selected_adapters=[model.active_adapter])
    tokenizer.save_pretrained(out)
    fix_adapter_config(out, model_id)
    (out / "README.md").write_text(card)
    return out


def save_full_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path, model_id: str, card: str
) -> Path:
    model.config._name_or_path = model_id
    # a model sharded over ranks (CPU fsdp): its weights gathered by all ranks, written by rank 0
    state_dict = distributed.full_state_dict(model)
    if state_dict != {}:
        model.save_pretrained(out, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(out)
    (out / "README.md").write_text(card)
    return out


def save_merged(
    adapter_dir: Path,
    base_dir: Path,
    tokenizer: PreTrainedTokenizerBase,
    out: Path,
    card: str,
    device: Device,
) -> Path:
    """Merges the saved adapter onto a freshly loaded full-precision base (QLoRA included: merging
    onto the 4-bit base would bake quantization error into every weight)."""
    from peft import PeftModel

    base = load_model(base_dir, device)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.config._name_or_path = json.loads((adapter_dir / "adapter_config.json").read_text())[
        "base_model_name_or_path"
    ]
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "README.md").write_text(card)
    return out


def _table(values: dict[str, Any]) -> str:
    lines = ["| name | value |", "| --- | --- |"]
    lines += [f"| {k} | {'' if v is None else v} |" for k, v in values.items()]
    return "\n".join(lines)


def model_card(
    *,
    model_id: str,
    method: str,
    adapter: dict[str, Any],
    hyperparameters: dict[str, Any],
    data: dict[str, Any],
    metrics: dict[str, Any],
    warnings: dict[str, int],
    trainable_params: int,
    total_params: int,
    kind: str,
) -> str:
    """The README of an adapter, full model or merged model."""
    adapter_type = adapter.get("type", "lora")
    percent = 100 * trainable_params / total_params if total_params else 0.0
    usage = (
        "```python\n"
        "from transformers import AutoModelForCausalLM\n"
        "from peft import PeftModel\n\n"
        f"# the base: `tuneforge models path {model_id}` prints its local directory\n"
        f'base = AutoModelForCausalLM.from_pretrained("{model_id}")\n'
        'model = PeftModel.from_pretrained(base, "path/to/this/adapter")\n'
        "```\n"
        if kind == "adapter"
        else "```python\nfrom transformers import AutoModelForCausalLM\n\n"
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/model")\n```\n'
    )
    front = [
        "---",
        f"base_model: {model_id}",
        "library_name: " + ("peft" if kind == "adapter" else "transformers"),
    ]
    front += ["tags:", "- tuneforge", f"- {method}", f"- {adapter_type}", "---", ""]
    data_sections = "\n\n".join(f"### {split}\n\n{_table(stats)}" for split, stats in data.items())
    return "\n".join(
        [
            *front,
            f"# {kind.capitalize()} fine-tuned from {model_id}",
            "",
            f"- Base model: `{model_id}`",
            f"- Method: {method}",
            f"- Adapter: {adapter_type}",
            f"- Trainable parameters: {trainable_params:,} of {total_params:,} ({percent:.4f}%)",
            "",
            "## Usage",
            "",
            usage,
            "## Adapter",
            "",
            _table(adapter),
            "",
            "## Effective hyperparameters",
            "",
            _table(hyperparameters),
            "",
            "## Data",
            "",
            data_sections,
            "",
            "## Warnings",
            "",
            _table(warnings) if warnings else "None.",
            "",
            "## Final metrics",
            "",
            _table(metrics),
            "",
            "Trained with Tuneforge (TRL, PEFT, transformers).",
            "",
        ]
    )
