"""Tokenization cache benchmark: the time from a run's start to its first training step (loading
the tokenizer and model, reading and measuring the file, TRL's preparation, building the trainer)
with an empty cache (the baseline: what every run paid before the cache) and with the entries the
first run left, on tuneforge/tiny-chat and a generated chat file, side by side in one process.

    .venv/bin/python bench/tokcache.py [--examples 4000] [--repeats 2]

Prints each run's setup seconds and CPU seconds and the ratio hit / miss. CPU seconds move less
with other load on the machine than wall time does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class FirstStep(Exception):
    """Raised at the start event: the run's setup is what is measured."""


class StopAtStart:
    def on_start(self, info: Any) -> None:
        raise FirstStep

    def on_metrics(self, metrics: Any) -> None: ...

    def on_checkpoint(self, step: int, path: Path, metrics: dict[str, Any]) -> None: ...

    def stop_requested(self) -> None:
        return None


def chat_file(path: Path, examples: int) -> Path:
    rng = random.Random(7)
    words = ["the", "a", "model", "data", "token", "answer", "question", "cache", "file", "step"]
    with path.open("w") as handle:
        for _ in range(examples):
            question = " ".join(rng.choices(words, k=rng.randint(8, 60)))
            answer = " ".join(rng.choices(words, k=rng.randint(8, 120)))
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            handle.write(json.dumps({"messages": messages}) + "\n")
    return path


def setup_time(
    model_dir: Path, data: Path, out: Path, cache: Path | None
) -> tuple[float, float, dict[str, Any]]:
    from tuneforge.models.spec import JobSpec
    from tuneforge.training import tokcache
    from tuneforge.training.interface import RunPaths
    from tuneforge.training.run import run_recipe

    spec = JobSpec.model_validate(
        {
            "model": "tuneforge/tiny-chat",
            "training_file": "file-bench",
            "seed": 7,
            "method": {
                "type": "supervised",
                "supervised": {"hyperparameters": {"max_steps": 1, "batch_size": 8}},
            },
        }
    )
    tokcache.configure(cache)
    paths = RunPaths(model_dir=model_dir, train_file=data, out_dir=out, model_id="tuneforge/tiny-chat")
    wall, cpu = time.perf_counter(), time.process_time()
    with contextlib.suppress(FirstStep):
        run_recipe(spec, paths, StopAtStart())
    result = time.perf_counter() - wall, time.process_time() - cpu, tokcache.summary()
    shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--examples", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from tuneforge.training.tiny_chat import build_tiny_chat

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model_dir = build_tiny_chat(tmp / "models")
        data = chat_file(tmp / "chat.jsonl", args.examples)
        setup_time(model_dir, data, tmp / "warm", None)  # imports and first-use costs, not counted
        print(f"{args.examples} chat examples, tiny-chat, LoRA; seconds from run start to the first step")
        misses, hits = [], []
        for repeat in range(args.repeats):
            cache = tmp / f"cache-{repeat}"
            miss = setup_time(model_dir, data, tmp / "miss", cache)
            hit = setup_time(model_dir, data, tmp / "hit", cache)
            misses.append(miss)
            hits.append(hit)
            print(
                f"  miss: {miss[0]:6.2f} s wall {miss[1]:6.2f} s cpu ({miss[2]['tokenization_cache']})   "
                f"hit: {hit[0]:6.2f} s wall {hit[1]:6.2f} s cpu ({hit[2]['tokenization_cache']})"
            )
        best_miss = min(m[1] for m in misses)
        best_hit = min(h[1] for h in hits)
        print(
            f"best cpu: miss {best_miss:.2f} s, hit {best_hit:.2f} s, hit/miss {best_hit / best_miss:.2f}; "
            f"best wall: miss {min(m[0] for m in misses):.2f} s, hit {min(h[0] for h in hits):.2f} s"
        )


if __name__ == "__main__":
    main()
