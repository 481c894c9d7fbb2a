"""GRPO steps per second: Tuneforge's reinforcement recipe (tuneforge/training/grpo.py, the job's
string_check grader as the reward) against a plain TRL GRPOTrainer script on the same data and
settings (tiny-chat, LoRA r=16 alpha=32 all-linear, 4 prompts x 4 answers per step, 16 new tokens,
beta 0.04, lr 1e-5, seed 1234), with a plain Python reward doing the same check. The two alternate
`--repeat` times in this one process (one intra-op thread, as the tests run), each pair in the
other order than the one before, after an untimed `--warmup`-step run of each (the process's
first training run pays one-time costs: lazy imports, kernel set-up); each figure is the steps of
a run over the seconds from the first step's start to the last step's end (model loading and
saving excluded), and the ratio is Tuneforge's median over the plain script's.

    .venv/bin/python bench/grpo.py [--steps 12] [--repeat 8] [--warmup 2] [--plain-without-checkpointing]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SEED = 1234
PROMPTS, GENERATIONS, NEW_TOKENS, BETA, LR = 4, 4, 16, 0.04, 1e-5
GRADER = {
    "type": "string_check",
    "name": "has the letter",
    "input": "{{sample.output_text}}",
    "reference": "{{item.letter}}",
    "operation": "like",
}


def write_data(path: Path, n: int = 32) -> Path:
    lines = [
        {"messages": [{"role": "user", "content": f"Write word number {i}."}], "letter": "e"}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


class Clock:
    """Seconds from the first step's start to the last step's end."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.end = 0.0
        self.steps = 0
        self.lengths: list[float] = []  # each step's mean completion length (TRL's log)

    def callback(self) -> Any:
        from transformers import TrainerCallback

        clock = self

        class Timing(TrainerCallback):
            def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                if clock.start is None:
                    clock.start = time.perf_counter()

            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                clock.end, clock.steps = time.perf_counter(), state.global_step

            def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
                if logs and "completions/mean_length" in logs:
                    clock.lengths.append(float(logs["completions/mean_length"]))

        return Timing()

    @property
    def steps_per_second(self) -> float:
        assert self.start is not None
        return self.steps / (self.end - self.start)

    @property
    def mean_length(self) -> float:
        return statistics.fmean(self.lengths) if self.lengths else float("nan")


def run_tuneforge(model_dir: Path, data: Path, out: Path, steps: int) -> Clock:
    import transformers

    from tuneforge.models.spec import JobSpec
    from tuneforge.training.interface import RunPaths
    from tuneforge.training.run import run_recipe

    clock = Clock()
    original = transformers.Trainer.__init__

    def with_clock(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.add_callback(clock.callback())

    hp = {
        "batch_size": PROMPTS,
        "num_generations": GENERATIONS,
        "max_new_tokens": NEW_TOKENS,
        "beta": BETA,
        "learning_rate": LR,
        "max_steps": steps,
        "save_every_steps": steps,
    }
    spec = JobSpec.model_validate(
        {
            "model": "tuneforge/tiny-chat",
            "training_file": "file-local",
            "seed": SEED,
            "method": {"type": "reinforcement", "reinforcement": {"grader": GRADER, "hyperparameters": hp}},
            "adapter": {"type": "lora", "r": 16, "alpha": 32, "dropout": 0.0},
        }
    )
    transformers.Trainer.__init__ = with_clock  # type: ignore[method-assign]
    try:
        run_recipe(
            spec, RunPaths(model_dir=model_dir, train_file=data, out_dir=out, model_id="tuneforge/tiny-chat")
        )
    finally:
        transformers.Trainer.__init__ = original  # type: ignore[method-assign]
    return clock


def run_plain(model_dir: Path, data: Path, out: Path, steps: int, checkpointing: bool = True) -> Clock:
    """What a user would write with TRL alone (with TRL's default gradient checkpointing, which the
    recipe turns off for a model whose activations fit; `checkpointing=False` matches it)."""
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    def has_letter(completions: list[Any], letter: list[str], **kwargs: Any) -> list[float]:
        return [float(want in c[-1]["content"]) for c, want in zip(completions, letter, strict=True)]

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    dataset = load_dataset("json", data_files=str(data), split="train").rename_column("messages", "prompt")
    args = GRPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=PROMPTS * GENERATIONS,
        num_generations=GENERATIONS,
        max_completion_length=NEW_TOKENS,
        beta=BETA,
        learning_rate=LR,
        max_steps=steps,
        seed=SEED,
        use_cpu=True,
        bf16=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        gradient_checkpointing=checkpointing,
    )
    clock = Clock()
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=has_letter,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"),
        callbacks=[clock.callback()],
    )
    trainer.train()
    return clock


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeat", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="Steps of the untimed first run of each.")
    parser.add_argument(
        "--plain-without-checkpointing",
        action="store_true",
        help="The plain script without gradient checkpointing (TRL's default is on), as the recipe runs.",
    )
    options = parser.parse_args()

    import torch

    from tuneforge.training.tiny_chat import build_tiny_chat

    torch.set_num_threads(1)
    checkpointing = not options.plain_without_checkpointing
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = build_tiny_chat(work / "models")
        data = write_data(work / "rft.jsonl")
        ours: list[Clock] = []
        plain: list[Clock] = []
        if options.warmup:
            run_tuneforge(model_dir, data, work / "ours-warmup", options.warmup)
            run_plain(model_dir, data, work / "plain-warmup", options.warmup, checkpointing)
        for i in range(options.repeat):
            if i % 2:
                plain.append(run_plain(model_dir, data, work / f"plain-{i}", options.steps, checkpointing))
                ours.append(run_tuneforge(model_dir, data, work / f"ours-{i}", options.steps))
            else:
                ours.append(run_tuneforge(model_dir, data, work / f"ours-{i}", options.steps))
                plain.append(run_plain(model_dir, data, work / f"plain-{i}", options.steps, checkpointing))
            print(
                f"run {i + 1}: tuneforge {ours[-1].steps_per_second:.2f} steps/s "
                f"(answers of {ours[-1].mean_length:.1f} tokens), plain TRL "
                f"{plain[-1].steps_per_second:.2f} steps/s ({plain[-1].mean_length:.1f} tokens)",
                flush=True,
            )
    ours_speed = [c.steps_per_second for c in ours]
    plain_speed = [c.steps_per_second for c in plain]
    ratio = statistics.median(ours_speed) / statistics.median(plain_speed)
    print(
        json.dumps(
            {
                "tuneforge_steps_per_s": round(statistics.median(ours_speed), 3),
                "plain_trl_steps_per_s": round(statistics.median(plain_speed), 3),
                "ratio": round(ratio, 3),
                "pairwise": [round(a / b, 3) for a, b in zip(ours_speed, plain_speed, strict=True)],
                "mean_answer_tokens": {
                    "tuneforge": round(statistics.fmean(c.mean_length for c in ours), 2),
                    "plain_trl": round(statistics.fmean(c.mean_length for c in plain), 2),
                },
            }
        )
    )


if __name__ == "__main__":
    main()
