"""Helpers for the training tests: tiny-chat runs on CPU, a recording observer, greedy answers."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from tuneforge.models.spec import JobSpec
from tuneforge.training.common import Finished
from tuneforge.training.interface import RunInfo, RunPaths, StepMetrics, StopReason
from tuneforge.training.run import run_recipe

DATA = Path(__file__).parent.parent / "data"


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> None:
    # Measured: on the shared 2-core machine one intra-op thread trains tiny-chat ~3x faster.
    torch.set_num_threads(1)


@dataclass
class RecordingObserver:
    """Records everything; asks to stop once `stop_after` steps are done (it is asked after each)."""

    stop_after: int | None = None
    stop_reason: StopReason = "pause"
    info: RunInfo | None = None
    metrics: list[StepMetrics] = field(default_factory=list)
    checkpoints: list[tuple[int, Path, dict[str, Any]]] = field(default_factory=list)
    steps_done: int = 0

    def on_start(self, info: RunInfo) -> None:
        self.info = info
        self.steps_done = info.start_step

    def on_metrics(self, metrics: StepMetrics) -> None:
        self.metrics.append(metrics)

    def on_checkpoint(self, step: int, path: Path, metrics: dict[str, Any]) -> None:
        self.checkpoints.append((step, path, metrics))

    def stop_requested(self) -> StopReason | None:
        self.steps_done += 1
        if self.stop_after is not None and self.steps_done >= self.stop_after:
            return self.stop_reason
        return None


def make_spec(
    method: str = "supervised",
    adapter: dict[str, Any] | None = None,
    seed: int = 7,
    export: list[str] | None = None,
    **hyperparameters: Any,
) -> JobSpec:
    return JobSpec.model_validate(
        {
            "model": "tuneforge/tiny-chat",
            "training_file": "file-local",
            "seed": seed,
            "method": {"type": method, method: {"hyperparameters": hyperparameters}},
            "adapter": adapter or {"type": "lora"},
            "export": export or [],
        }
    )


def train(
    spec: JobSpec,
    model_dir: Path,
    train_file: Path,
    out_dir: Path,
    observer: RecordingObserver | None = None,
    valid_file: Path | None = None,
    resume_from: Path | None = None,
) -> Finished:
    paths = RunPaths(
        model_dir=model_dir,
        train_file=train_file,
        out_dir=out_dir,
        valid_file=valid_file,
        resume_from=resume_from,
        model_id="tuneforge/tiny-chat",
    )
    return run_recipe(spec, paths, observer)


def read_metrics(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def train_losses(path: Path) -> list[float]:
    return [float(row["train_loss"]) for row in read_metrics(path) if row["train_loss"]]


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def qa_pairs() -> list[tuple[list[dict[str, str]], str]]:
    rows = [json.loads(line)["messages"] for line in (DATA / "qa.jsonl").read_text().splitlines()]
    return [(m[:-1], m[-1]["content"]) for m in rows]


@torch.no_grad()
def greedy_answers(model: Any, tokenizer: Any, prompts: list[list[dict[str, str]]]) -> list[str]:
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    model.eval()
    out = model.generate(**batch, max_new_tokens=16, do_sample=False)
    tokenizer.padding_side = "right"
    return [
        tokenizer.decode(row, skip_special_tokens=True).strip()
        for row in out[:, batch["input_ids"].shape[1] :]
    ]
