"""Check the memory model against a real run: train tiny-chat on CPU for a few steps in a fresh
process and compare the growth of its peak RSS with the estimate.

    python -m tuneforge.estimates.calibrate [--adapters full,lora,qlora] [--batch-size 8] [--seq-len 512]

Each measurement runs in its own child process (`--child`), so one run's allocations never hide in
another's peak. The loop is a plain PyTorch loop doing what the supervised recipe does on CPU: fp32
weights, AdamW, right-padded batches with an attention mask, PEFT adapters (QLoRA: bitsandbytes 4-bit
with `prepare_model_for_kbit_training`, no gradient checkpointing).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tuneforge.models.spec import AdapterSpec

STEPS = 3
#: Fixed glibc mmap threshold: big tensors are mapped and unmapped, so RSS follows live memory
#: instead of the heap high-water mark that glibc's adaptive threshold leaves behind.
MMAP_THRESHOLD = 1 << 20


@dataclass
class Calibration:
    adapter: str
    batch_size: int
    seq_len: int
    estimated_bytes: int
    measured_bytes: int
    checkpointing: bool = False

    @property
    def error(self) -> float:
        return (self.estimated_bytes - self.measured_bytes) / self.measured_bytes


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """This process's own high-water RSS (VmHWM). Not getrusage's ru_maxrss: Linux carries the
    parent's high-water mark across fork/vfork and exec into it, so a child started from a big
    process (a long pytest run) would report its parent's peak."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM")


def _child(
    model_dir: Path,
    adapter_type: str,
    batch_size: int,
    seq_len: int,
    steps: int = STEPS,
    threads: int = 1,
    checkpointing: bool = False,
) -> dict[str, float]:
    import time

    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if adapter_type == "qlora":
        import bitsandbytes  # noqa: F401  # import cost outside the measurement
    import peft  # noqa: F401

    from tuneforge.estimates import skeleton  # noqa: F401

    vocab = 1000
    lengths = torch.randint(seq_len // 2, seq_len + 1, (batch_size,))
    lengths[0] = seq_len
    ids = torch.randint(10, vocab, (batch_size, seq_len))
    mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    baseline = _rss()

    kwargs: dict[str, object] = {"dtype": torch.float32}
    if adapter_type == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", **kwargs)
    if adapter_type != "full":
        from peft import get_peft_model, prepare_model_for_kbit_training

        from tuneforge.estimates.skeleton import peft_config

        if adapter_type == "qlora":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        spec = AdapterSpec.model_validate({"type": adapter_type})
        model = get_peft_model(model, peft_config(spec, model))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    started = 0.0
    for step in range(steps):
        if step == 1:  # the first step allocates optimizer states and warms kernels up
            started = time.perf_counter()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - started
    real_tokens = int(mask.sum()) * (steps - 1)
    return {"baseline": baseline, "peak": peak_rss(), "tokens_per_second": real_tokens / elapsed}


class _Clock:
    """A run observer that notes when each step's metrics arrive and the tokens seen by then."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, int]] = []

    def on_start(self, info: Any) -> None:
        pass

    def on_metrics(self, metrics: Any) -> None:
        import time

        if metrics.tokens_seen is not None and metrics.train_loss is not None:
            self.marks.append((time.perf_counter(), int(metrics.tokens_seen)))

    def on_checkpoint(self, step: int, path: Path, metrics: dict[str, Any]) -> None:
        pass

    def stop_requested(self) -> None:
        return None

    def tokens_per_second(self) -> float:
        if len(self.marks) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self.marks[0], self.marks[-1]
        return (n1 - n0) / (t1 - t0)


def _recipe_child(
    model_dir: Path, adapter_type: str, batch_size: int, seq_len: int, steps: int, threads: int = 1
) -> dict[str, float]:
    """The same measurement through the training recipe itself (TRL SFTTrainer via
    `run_training`), on chat examples long enough to fill `seq_len` after truncation."""
    import random
    import tempfile

    import accelerate  # noqa: F401
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401
    import trl  # noqa: F401
    from trl import SFTConfig, SFTTrainer  # noqa: F401

    from tuneforge.models.spec import JobSpec
    from tuneforge.training import supervised  # noqa: F401
    from tuneforge.training.interface import RunPaths
    from tuneforge.training.run import run_training
    from tuneforge.training.tiny_chat import CORPUS

    torch.set_num_threads(threads)
    if adapter_type == "qlora":
        import bitsandbytes  # noqa: F401
    words = CORPUS.read_text().split()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        train = Path(tmp) / "train.jsonl"
        with train.open("w") as out:
            for _ in range(batch_size * (steps + 1)):
                answer = " ".join(rng.choice(words) for _ in range(seq_len * 2))
                messages = [
                    {"role": "user", "content": "Tell me a story."},
                    {"role": "assistant", "content": answer},
                ]
                out.write(json.dumps({"messages": messages}) + "\n")
        spec = JobSpec.model_validate(
            {
                "model": "tuneforge/tiny-chat",
                "training_file": "file-calibration",
                "seed": 0,
                "adapter": {"type": adapter_type},
                "method": {
                    "type": "supervised",
                    "supervised": {
                        "hyperparameters": {
                            "batch_size": batch_size,
                            "max_seq_length": seq_len,
                            "max_steps": steps,
                            "n_epochs": 1,
                            "save_every_steps": 10 * steps,
                            "packing": False,
                        }
                    },
                },
            }
        )
        baseline = _rss()
        clock = _Clock()
        run_training(spec, RunPaths(model_dir=model_dir, train_file=train, out_dir=Path(tmp) / "out"), clock)
        return {"baseline": baseline, "peak": peak_rss(), "tokens_per_second": clock.tokens_per_second()}


def measure(
    model_dir: Path,
    adapter_type: str,
    batch_size: int,
    seq_len: int,
    checkpointing: bool = False,
    recipe: bool = False,
) -> int:
    """Peak RSS growth, in bytes, of a short real run in a fresh process."""
    result = _run_child(model_dir, adapter_type, batch_size, seq_len, STEPS, 1, checkpointing, recipe)
    return int(result["peak"]) - int(result["baseline"])


def measure_recipe_throughput(
    model_dir: Path, adapter_type: str, batch_size: int, seq_len: int, steps: int
) -> float:
    """Real tokens per second of the training recipe (TRL), all cores, between the first and the
    last step's metrics (the first step's warm-up left out)."""
    threads = len(os.sched_getaffinity(0))
    result = _run_child(model_dir, adapter_type, batch_size, seq_len, steps, threads, recipe=True)
    return float(result["tokens_per_second"])


def measure_throughput(
    model_dir: Path, adapter_type: str, batch_size: int, seq_len: int, steps: int
) -> float:
    """Real (non-padding) tokens per second of the same loop, all cores, after a warm-up step."""
    threads = len(os.sched_getaffinity(0))
    return float(
        _run_child(model_dir, adapter_type, batch_size, seq_len, steps, threads)["tokens_per_second"]
    )


def _run_child(
    model_dir: Path,
    adapter_type: str,
    batch_size: int,
    seq_len: int,
    steps: int,
    threads: int,
    checkpointing: bool = False,
    recipe: bool = False,
) -> dict[str, float]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
    }
    out = subprocess.run(
        [
            *(sys.executable, "-m", "tuneforge.estimates.calibrate", "--child", str(model_dir)),
            *(adapter_type, "--batch-size", str(batch_size), "--seq-len", str(seq_len)),
            *("--steps", str(steps), "--threads", str(threads)),
            *(["--gradient-checkpointing"] if checkpointing else []),
            *(["--recipe"] if recipe else []),
        ],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def calibrate(
    model_dir: Path,
    adapter_type: str,
    batch_size: int,
    seq_len: int,
    checkpointing: bool = False,
    recipe: bool = False,
) -> Calibration:
    """Estimate against a measured peak; `recipe` measures a run of the training recipe itself."""
    from tuneforge.estimates.calculator import estimate
    from tuneforge.estimates.schema import EstimateRequest, Hardware

    config = json.loads((model_dir / "config.json").read_text())
    request = EstimateRequest.model_validate(
        {
            "model_config": config,
            "adapter": {"type": adapter_type},
            "hyperparameters": {"batch_size": batch_size, "max_seq_length": seq_len},
            "hardware": Hardware(gpu="cpu").model_dump(),
            "dtype": "fp32",
            "gradient_checkpointing": checkpointing,
        }
    )
    estimated = estimate(request).memory.total
    return Calibration(
        adapter_type,
        batch_size,
        seq_len,
        estimated,
        measure(model_dir, adapter_type, batch_size, seq_len, checkpointing, recipe),
        checkpointing,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--child", nargs=2, metavar=("MODEL_DIR", "ADAPTER"), help=argparse.SUPPRESS)
    parser.add_argument("--adapters", default="full,lora,qlora")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=STEPS, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--recipe", action="store_true", help="Measure through run_training (TRL).")
    args = parser.parse_args(argv)
    if args.child and args.recipe:
        result = _recipe_child(
            Path(args.child[0]), args.child[1], args.batch_size, args.seq_len, args.steps, args.threads
        )
        print(json.dumps(result))
        return 0
    if args.child:
        child = _child(
            Path(args.child[0]),
            args.child[1],
            args.batch_size,
            args.seq_len,
            args.steps,
            args.threads,
            args.gradient_checkpointing,
        )
        print(json.dumps(child))
        return 0
    from tuneforge.config import get_settings
    from tuneforge.training.tiny_chat import build_tiny_chat

    model_dir = build_tiny_chat(get_settings().models_dir)
    print("| adapter | batch x seq | checkpointing | estimated MiB | measured RSS growth MiB | error |")
    print("| --- | --- | --- | --- | --- | --- |")
    for adapter_type in args.adapters.split(","):
        c = calibrate(
            model_dir, adapter_type, args.batch_size, args.seq_len, args.gradient_checkpointing, args.recipe
        )
        print(
            f"| {c.adapter} | {c.batch_size} x {c.seq_len} | {'on' if c.checkpointing else 'off'} | "
            f"{c.estimated_bytes / 2**20:,.1f} | "
            f"{c.measured_bytes / 2**20:,.1f} | {c.error:+.1%} |",
            flush=True,
        )
        if os.environ.get("TUNEFORGE_CALIBRATION_JSON"):
            print(json.dumps(asdict(c)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
