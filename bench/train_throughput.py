"""Training throughput: Tuneforge's supervised LoRA recipe against a plain TRL SFTTrainer script.

One run measures, each variant in its own child process (so peak RSS is its own):
  - tuneforge LoRA vs plain TRL, on chat data of varied length (about 20-400 tokens) and on
    uniform-length data: real (non-padding) trained tokens per second, peak RSS, the ratios;
  - tuneforge LoRA vs QLoRA peak memory.
Same model, data, hyperparameters (LoRA r=16, alpha=32, all-linear, batch 8, lr 2e-4, max length
512, one epoch) and seed for every variant. The plain script keeps TRL's defaults (random order,
padding to the longest in the batch) except what CPU needs (bf16 off) and gradient checkpointing off
(TRL's default on would only slow the baseline down; we do not count that in our favour).

    python bench/train_throughput.py                      # tiny-chat on this machine's CPU
    python bench/train_throughput.py --config llama-3.2-1b  # a real-size architecture, random
        weights (GPU): adds MFU and peak GPU memory for LoRA and QLoRA
    python bench/train_throughput.py --config path/to/config.json

Throughput needs no trained weights, so --config builds the model from its config with random
weights; the data are generated deterministically from a seed.
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
BATCH_SIZE = 8
LEARNING_RATE = 2e-4
MAX_LENGTH = 512

# Real-size architectures (public configs), built with random weights.
PRESETS: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": {
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
    },
    "llama-3.1-8b": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
    },
}

# Dense bf16 peak TFLOP/s by GPU name, for MFU.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


# --------------------------------------------------------------------------- data


def _words() -> list[str]:
    text = (ROOT / "tuneforge" / "training" / "corpus" / "tiny_chat_corpus.txt").read_text()
    return sorted({w for w in text.split() if w.isascii()})


def _text_of(tokenizer: Any, rng: random.Random, words: list[str], n_tokens: int) -> str:
    out: list[str] = []
    while True:
        out.append(rng.choice(words))
        if (
            len(out) % 8 == 0
            and len(tokenizer(" ".join(out), add_special_tokens=False)["input_ids"]) >= n_tokens
        ):
            return " ".join(out)


def make_chat_data(tokenizer: Any, path: Path, n: int, lengths: tuple[int, int], seed: int) -> dict[str, Any]:
    """n conversations whose templated length falls in `lengths` (tokens), deterministically."""
    rng, words = random.Random(seed), _words()
    overhead = len(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}],
            tokenize=True,
            return_dict=True,
        )["input_ids"]
    )
    sizes = []
    with path.open("w") as handle:
        for _ in range(n):
            total = rng.randint(*lengths) - overhead
            user = max(2, int(total * rng.uniform(0.2, 0.5)))
            messages = [
                {"role": "user", "content": _text_of(tokenizer, rng, words, user)},
                {"role": "assistant", "content": _text_of(tokenizer, rng, words, max(2, total - user))},
            ]
            sizes.append(
                len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
            )
            handle.write(json.dumps({"messages": messages}) + "\n")
    return {"examples": n, "tokens": sum(sizes), "min_tokens": min(sizes), "max_tokens": max(sizes)}


# --------------------------------------------------------------------------- children


def _peak_rss_mib() -> float:
    from tuneforge.estimates.calibrate import peak_rss

    return peak_rss() / 2**20


def _gpu_stats() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {}
    return {
        "gpu": torch.cuda.get_device_name(0),
        "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
    }


class _Clock:
    """Wall time from the first step's start to the last step's log, and the real tokens in it."""

    def __init__(self) -> None:
        self.begin = 0.0
        self.end = 0.0
        self.tokens = 0
        self.steps = 0

    def started(self) -> None:
        self.begin = time.perf_counter()

    def stepped(self, step: int, tokens: int) -> None:
        self.end, self.tokens, self.steps = time.perf_counter(), tokens, step

    def result(self) -> dict[str, Any]:
        seconds = self.end - self.begin
        return {
            "steps": self.steps,
            "real_tokens": self.tokens,
            "seconds": round(seconds, 2),
            "tokens_per_second": round(self.tokens / seconds, 1) if seconds > 0 else None,
        }


def child_tuneforge(model_dir: Path, data: Path, out: Path, adapter: str) -> dict[str, Any]:
    from tuneforge.models.spec import JobSpec
    from tuneforge.training.interface import RunInfo, RunPaths, StepMetrics
    from tuneforge.training.run import run_recipe

    clock = _Clock()

    class Observer:
        def on_start(self, info: RunInfo) -> None:
            clock.started()

        def on_metrics(self, metrics: StepMetrics) -> None:
            clock.stepped(metrics.step, metrics.tokens_seen or 0)

        def on_checkpoint(self, step: int, path: Path, metrics: dict[str, Any]) -> None:
            pass

        def stop_requested(self) -> None:
            return None

    spec = JobSpec.model_validate(
        {
            "model": "bench/model",
            "training_file": str(data),
            "seed": SEED,
            "method": {
                "type": "supervised",
                "supervised": {
                    "hyperparameters": {
                        "n_epochs": 1,
                        "batch_size": BATCH_SIZE,
                        "learning_rate": LEARNING_RATE,
                        "max_seq_length": MAX_LENGTH,
                    }
                },
            },
            "adapter": {"type": adapter, "r": 16, "alpha": 32, "dropout": 0.05},
        }
    )
    finished = run_recipe(spec, RunPaths(model_dir=model_dir, train_file=data, out_dir=out), Observer())
    return {
        **clock.result(),
        "batching": finished.result.report["hyperparameters"]["batching"],
        "trainable_params": finished.result.trainable_params,
        "total_params": finished.result.total_params,
    }


def child_plain_trl(model_dir: Path, data: Path, out: Path) -> dict[str, Any]:
    """What a user writes from TRL's quick start: defaults, plus what CPU needs."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    clock = _Clock()

    class Timing(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock.started()

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if logs and "loss" in logs:
                clock.stepped(state.global_step, int(state.num_input_tokens_seen))

    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if cuda else torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    args = SFTConfig(
        output_dir=str(out),
        num_train_epochs=1,
        per_device_train_batch_size=BATCH_SIZE,
        learning_rate=LEARNING_RATE,
        max_length=MAX_LENGTH,
        seed=SEED,
        bf16=cuda,
        use_cpu=not cuda,
        gradient_checkpointing=False,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=load_dataset("json", data_files=str(data), split="train"),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear"),
        callbacks=[Timing()],
    )
    trainer.train()
    return {**clock.result(), "batching": "random order, padded to longest"}


def run_child(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", required=True, choices=["tuneforge", "plain"])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--adapter", default="lora")
    args = parser.parse_args(argv)
    if args.child == "tuneforge":
        stats = child_tuneforge(args.model_dir, args.data, args.out, args.adapter)
    else:
        stats = child_plain_trl(args.model_dir, args.data, args.out)
    return {**stats, "peak_rss_mib": round(_peak_rss_mib(), 1), **_gpu_stats()}


# --------------------------------------------------------------------------- parent


def build_random_model(config_arg: str, into: Path) -> tuple[Path, dict[str, Any]]:
    """A model directory from a preset name or a config.json, with random weights and tiny-chat's
    tokenizer (its ids fit any vocabulary); bf16 on disk."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from tuneforge.training.tiny_chat import build_tiny_chat

    if config_arg in PRESETS:
        values = dict(PRESETS[config_arg])
        config = AutoConfig.for_model(values.pop("model_type"), **values)
    else:
        config = AutoConfig.from_pretrained(Path(config_arg))
    tokenizer = AutoTokenizer.from_pretrained(build_tiny_chat(into / "models"))
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(SEED)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    params = model.num_parameters()
    target = into / "random-model"
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    del model
    arch = {
        "config": config_arg,
        "params": params,
        "layers": config.num_hidden_layers,
        "hidden": config.hidden_size,
    }
    return target, arch


def model_flops_per_token(arch: dict[str, Any], mean_len: float, full: bool) -> float:
    """PaLM's count: 6N + 12 L H T per trained token for full training; a frozen base skips the
    weight gradients (a third), so PEFT runs count 4N + 8 L H T."""
    per_token = 6 * arch["params"] + 12 * arch["layers"] * arch["hidden"] * mean_len
    return per_token if full else per_token * 2 / 3


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=480, help="examples per data set")
    parser.add_argument("--config", default=None, help=f"preset ({', '.join(PRESETS)}) or config.json")
    parser.add_argument("--repeat", type=int, default=1, help="runs per variant; the best is kept")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads per run (same for every variant; 1 is fastest on a shared 2-core box)",
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help="GPU peak for MFU (bf16, dense)")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from tuneforge.training.tiny_chat import build_tiny_chat

    work = Path(tempfile.mkdtemp(prefix="tf-bench-"))
    arch: dict[str, Any] | None = None
    if args.config:
        model_dir, arch = build_random_model(args.config, work)
    else:
        model_dir = build_tiny_chat(work / "models")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    datasets = {
        "varied": make_chat_data(tokenizer, work / "varied.jsonl", args.examples, (20, 400), SEED),
        "uniform": make_chat_data(tokenizer, work / "uniform.jsonl", args.examples, (200, 208), SEED + 1),
    }

    def measure(kind: str, data: str, adapter: str = "lora") -> dict[str, Any]:
        best: dict[str, Any] | None = None
        for attempt in range(args.repeat):
            out = work / f"out-{kind}-{data}-{adapter}-{attempt}"
            command = [sys.executable, __file__, "--child", kind, "--model-dir", str(model_dir)]
            command += ["--data", str(work / f"{data}.jsonl"), "--out", str(out), "--adapter", adapter]
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
            env |= {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
            done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
            if done.returncode != 0:
                raise SystemExit(f"{kind}/{data}/{adapter} failed:\n{done.stderr[-4000:]}")
            stats = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"  {kind:9} {adapter:5} {data:7} {stats}", file=sys.stderr)
            if best is None or (stats["tokens_per_second"] or 0) > (best["tokens_per_second"] or 0):
                best = stats
        assert best is not None
        return best

    print(f"model: {arch or 'tuneforge/tiny-chat'}; data: {datasets}", file=sys.stderr)
    results: dict[str, Any] = {
        "model": arch or "tuneforge/tiny-chat",
        "data": datasets,
        "threads": args.threads,
        "repeat": args.repeat,
        "runs": {},
    }
    runs = results["runs"]
    for data in ("varied", "uniform"):
        runs[f"plain_lora_{data}"] = measure("plain", data)
        runs[f"tuneforge_lora_{data}"] = measure("tuneforge", data)
    runs["tuneforge_qlora_varied"] = measure("tuneforge", "varied", "qlora")

    def ratio(a: str, b: str, key: str) -> float:
        return round(runs[a][key] / runs[b][key], 3)

    results["ratios"] = {
        "tokens_per_second_varied": ratio("tuneforge_lora_varied", "plain_lora_varied", "tokens_per_second"),
        "tokens_per_second_uniform": ratio(
            "tuneforge_lora_uniform", "plain_lora_uniform", "tokens_per_second"
        ),
        "peak_rss_varied": ratio("tuneforge_lora_varied", "plain_lora_varied", "peak_rss_mib"),
        "qlora_over_lora_peak_rss": ratio("tuneforge_qlora_varied", "tuneforge_lora_varied", "peak_rss_mib"),
    }
    if "peak_gpu_mib" in runs["tuneforge_lora_varied"]:
        results["ratios"]["qlora_over_lora_peak_gpu"] = ratio(
            "tuneforge_qlora_varied", "tuneforge_lora_varied", "peak_gpu_mib"
        )
    if arch is not None and "gpu" in runs["tuneforge_lora_varied"]:
        gpu = runs["tuneforge_lora_varied"]["gpu"]
        peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in gpu), None)
        mean_len = datasets["varied"]["tokens"] / datasets["varied"]["examples"]
        if peak:
            for run in runs.values():
                flops = model_flops_per_token(arch, mean_len, full=False) * run["tokens_per_second"]
                run["mfu"] = round(flops / (peak * 1e12), 4)
            results["peak_tflops"] = peak
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    if "--child" in sys.argv:
        print(json.dumps(run_child(sys.argv[1:])))
        raise SystemExit(0)
    raise SystemExit(main())
