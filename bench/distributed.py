"""Multi-device scaling: tokens/s of the supervised recipe on 1 process against 2 processes under
torchrun (tuneforge/training/distributed.py), same model, data, seed and global batch, and the
scaling efficiency (tokens/s on N processes / (N x tokens/s on 1)).

    python bench/distributed.py                # CPU: 1 vs 2 gloo processes, tiny-chat, LoRA
    python bench/distributed.py --adapter full # full fine-tuning (replicated on CPU)
    python bench/distributed.py --cuda         # GPUs: 1 vs 2 (or --nproc N) nccl processes

On CPU both sides get the same cores by default (`--threads`, default --nproc, OMP threads): one
process with all of them, or N processes with a share each; `--threads-per-process 1` gives every
process one thread instead (N processes on N cores against 1 on one: the data-parallel scaling
per core, the measure that holds on an oversubscribed machine, where a process's threads wait for
each other). Each side runs in its own torchrun, one after
the other, `--repeats` times alternating; the best round of each side is compared (a shared
machine gives single rounds a wide spread). Speed is trained (non-padding) tokens over the
training loop's own time (from the run's start event to its last step's metrics): model loading
and process start are excluded.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SEED = 1234


def _data(path: Path, n: int) -> None:
    rng = random.Random(SEED)
    words = [
        "alpha",
        "beta",
        "gamma",
        "delta",
        "epsilon",
        "zeta",
        "eta",
        "theta",
        "iota",
        "kappa",
        "lambda",
        "mu",
        "nu",
        "xi",
        "omicron",
    ]
    with path.open("w") as out:
        for i in range(n):
            question = " ".join(rng.choices(words, k=rng.randint(5, 30)))
            answer = " ".join(rng.choices(words, k=rng.randint(20, 120)))
            messages = [
                {"role": "user", "content": f"{i}: {question}?"},
                {"role": "assistant", "content": answer},
            ]
            out.write(json.dumps({"messages": messages}) + "\n")


class _Clock:
    """The observer rank 0 reports to: tokens and time of the training loop."""

    def __init__(self) -> None:
        self.first: tuple[float, int] | None = None
        self.last: tuple[float, int] | None = None

    def on_start(self, info: Any) -> None:
        self.first = (time.perf_counter(), 0)

    def on_metrics(self, metrics: Any) -> None:
        self.last = (time.perf_counter(), int(metrics.tokens_seen))

    def on_checkpoint(self, step: int, path: Path, metrics: dict[str, Any]) -> None:
        pass

    def stop_requested(self) -> None:
        return None


def _rank_main(args: argparse.Namespace) -> int:
    """One rank (under torchrun): train, and rank 0 writes its numbers to --result."""
    from tuneforge.models.spec import JobSpec
    from tuneforge.training import distributed
    from tuneforge.training.interface import RunPaths
    from tuneforge.training.run import run_training

    spec = JobSpec.model_validate(
        {
            "model": "tuneforge/tiny-chat",
            "training_file": "file-bench",
            "seed": SEED,
            "adapter": {"type": args.adapter},
            "hardware": {"count": distributed.world_size(), "strategy": "auto"},
            "method": {
                "type": "supervised",
                "supervised": {
                    "hyperparameters": {
                        "batch_size": args.batch_size,
                        "max_steps": args.steps,
                        "save_every_steps": 10_000,
                        "max_seq_length": 512,
                        "n_epochs": 50,
                        "packing": False,
                    }
                },
            },
        }
    )
    clock = _Clock()
    out = Path(args.result).parent / f"out-{distributed.world_size()}"
    result = run_training(
        spec, RunPaths(model_dir=Path(args.model_dir), train_file=Path(args.data), out_dir=out), clock
    )
    if distributed.rank() == 0:
        assert clock.first is not None and clock.last is not None
        seconds = clock.last[0] - clock.first[0]
        Path(args.result).write_text(
            json.dumps(
                {
                    "world_size": distributed.world_size(),
                    "steps": result.final_step,
                    "tokens": result.trained_tokens,
                    "seconds": seconds,
                    "tokens_per_second": clock.last[1] / seconds,
                    "loss": result.metrics.get("train_loss"),
                }
            )
        )
    return 0


def _run(nproc: int, args: argparse.Namespace, data: Path, model_dir: Path, work: Path) -> dict[str, Any]:
    from tuneforge.training.distributed import launch_command, launch_env

    result = work / f"result-{nproc}.json"
    result.unlink(missing_ok=True)
    command = launch_command(nproc, "bench.distributed", "--rank", "--result", str(result))
    command += ["--data", str(data), "--model-dir", str(model_dir), "--adapter", args.adapter]
    command += ["--steps", str(args.steps), "--batch-size", str(args.batch_size)]
    threads = args.threads_per_process or max(1, (args.threads or args.nproc) // nproc)  # same cores
    env = {**os.environ, **launch_env(), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    if not args.cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    subprocess.run(
        command, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    numbers: dict[str, Any] = json.loads(result.read_text())
    return numbers


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cuda", action="store_true", help="GPUs (nccl) instead of CPU processes (gloo).")
    parser.add_argument("--nproc", type=int, default=2, help="Processes of the multi-device side.")
    parser.add_argument("--adapter", default="lora", help="lora (DDP) or full (FSDP on CUDA).")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8, help="The global batch.")
    parser.add_argument("--examples", type=int, default=800)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads in all (default --nproc): 1 process gets them all, N processes a share each.",
    )
    parser.add_argument(
        "--threads-per-process",
        type=int,
        default=None,
        help="OMP threads of every process on both sides (overrides --threads): scaling per core.",
    )
    parser.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank:
        return _rank_main(args)

    from tuneforge.training.tiny_chat import build_tiny_chat

    work = Path(tempfile.mkdtemp(prefix="tuneforge-bench-ddp-"))
    model_dir = build_tiny_chat(work / "models")
    data = work / "train.jsonl"
    _data(data, args.examples)
    rounds: dict[int, list[dict[str, Any]]] = {1: [], args.nproc: []}
    for _ in range(args.repeats):
        for nproc in rounds:
            numbers = _run(nproc, args, data, model_dir, work)
            rounds[nproc].append(numbers)
            print(json.dumps(numbers), flush=True)
    best = {n: max(r, key=lambda x: x["tokens_per_second"]) for n, r in rounds.items()}
    one, many = best[1]["tokens_per_second"], best[args.nproc]["tokens_per_second"]
    print(
        f"device: {'cuda' if args.cuda else 'cpu'}, adapter {args.adapter}, global batch {args.batch_size}, "
        + (
            f"threads per process {args.threads_per_process}"
            if args.threads_per_process
            else f"threads {args.threads or args.nproc}"
        )
    )
    print(f"1 process: {one:,.0f} tokens/s (best of {args.repeats})")
    print(f"{args.nproc} processes: {many:,.0f} tokens/s (best of {args.repeats})")
    print(f"speed-up {many / one:.2f}x, scaling efficiency {many / (args.nproc * one):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
