"""Benchmark of the cost calculator: warm 8B estimate latency against the cold path (building the
meta skeleton and applying PEFT without the cache) in the same run, and, with --throughput, the
CPU training throughput of tiny-chat through the training recipe, which feeds
tuneforge.estimates.hardware.THROUGHPUT.

    .venv/bin/python bench/estimate_bench.py [--warm 500] [--cold 5] [--throughput]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.model_configs import LLAMA_31_8B
from tuneforge.estimates import EstimateRequest, estimate
from tuneforge.estimates.skeleton import clear_cache


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def latency(warm: int, cold: int) -> None:
    request = EstimateRequest.model_validate(
        {
            "model_config": LLAMA_31_8B,
            "adapter": {"type": "lora", "r": 16, "target_modules": ["q_proj", "v_proj"]},
            "hardware": {"gpu": "a100-80gb"},
            "n_examples": 20_000,
            "n_tokens": 8_000_000,
        }
    )
    estimate(request)  # imports torch/transformers/peft once, outside both measurements
    cold_ms = []
    for _ in range(cold):
        clear_cache()
        start = time.perf_counter()
        estimate(request)
        cold_ms.append((time.perf_counter() - start) * 1000)
    warm_ms = []
    for _ in range(warm):
        start = time.perf_counter()
        estimate(request)
        warm_ms.append((time.perf_counter() - start) * 1000)
    print("| path | calls | p50 ms | p99 ms | mean ms |")
    print("| --- | --- | --- | --- | --- |")
    for name, values in (
        ("cold (no cache: meta build + PEFT)", cold_ms),
        ("warm (cached skeleton)", warm_ms),
    ):
        print(
            f"| {name} | {len(values)} | {statistics.median(values):.2f} | {_percentile(values, 0.99):.2f} | "
            f"{statistics.fmean(values):.2f} |"
        )
    print(f"\nwarm p50 is {statistics.median(cold_ms) / statistics.median(warm_ms):,.0f}x faster than cold")
    print(f"warm p99 {_percentile(warm_ms, 0.99):.2f} ms against the 500 ms goal")


def throughput(steps: int, repeats: int) -> None:
    """Training throughput of the recipe jobs run (run_training: TRL SFTTrainer), tiny-chat on this
    machine's CPU, batch 8 x 512 of real tokens; the best of `repeats` runs, since other work on a
    shared machine only ever slows a run down."""
    from tuneforge.config import get_settings
    from tuneforge.estimates.calibrate import measure_recipe_throughput
    from tuneforge.training.tiny_chat import build_tiny_chat

    model_dir = build_tiny_chat(get_settings().models_dir)
    print("\n| hardware | model | run | batch x seq | real tokens/s (best) | all runs |")
    print("| --- | --- | --- | --- | --- | --- |")
    for adapter in ("full", "lora"):
        runs = [measure_recipe_throughput(model_dir, adapter, 8, 512, steps) for _ in range(repeats)]
        listed = ", ".join(f"{r:,.0f}" for r in runs)
        print(
            f"| cpu | tuneforge/tiny-chat | {adapter} | 8 x 512 | {max(runs):,.0f} | {listed} |", flush=True
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--warm", type=int, default=500)
    parser.add_argument("--cold", type=int, default=5)
    parser.add_argument("--throughput", action="store_true")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    latency(args.warm, args.cold)
    if args.throughput:
        throughput(args.steps, args.repeats)


if __name__ == "__main__":
    main()
