"""`tuneforge estimate`: the calculator on the command line, as a table or JSON."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

GIB = 2**30


def add_parser(commands: Any) -> None:
    """Adds the `estimate` sub-command to the `tuneforge` parser's sub-commands."""
    p: argparse.ArgumentParser = commands.add_parser(
        "estimate",
        help="What a fine-tuning job costs: parameters, memory, steps, time, and advice.",
        description="Example: tuneforge estimate --model-config config.json --adapter lora --r 16 "
        "--target-modules q_proj,v_proj --gpu-memory-gb 24",
    )
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", help="A base model id on offer (tuneforge models list).")
    model.add_argument("--model-config", type=Path, help="A Hugging Face config.json.")
    p.add_argument(
        "--adapter", default="lora", help="lora, qlora, dora, prefix_tuning, prompt_tuning, ia3, full."
    )
    p.add_argument("--r", type=int, default=None, help="LoRA rank.")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha.")
    p.add_argument("--dropout", type=float, default=None, help="LoRA dropout.")
    p.add_argument("--target-modules", default=None, help="Comma-separated module names, or all-linear.")
    p.add_argument("--num-virtual-tokens", type=int, default=None, help="Prefix/prompt tuning tokens.")
    p.add_argument("--quant-type", choices=["nf4", "fp4"], default=None, help="QLoRA 4-bit type.")
    p.add_argument("--no-double-quant", action="store_true", help="QLoRA without double quantization.")
    p.add_argument("--method", default="supervised", help="A method.type (supervised, dpo, ...).")
    p.add_argument("--n-tokens", type=int, default=None, help="Tokens in one epoch.")
    p.add_argument("--n-examples", type=int, default=None, help="Examples in one epoch.")
    p.add_argument("--n-epochs", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None, help="max_seq_length (default 1024).")
    p.add_argument("--batch-size", type=int, default=None, help="Micro-batch size (default 8).")
    p.add_argument("--gradient-accumulation-steps", type=int, default=None)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None)
    p.add_argument("--gpu", default=None, help="Hardware class: a100-80gb, h100-80gb, l4, cpu, ...")
    p.add_argument("--gpu-memory-gb", type=float, default=None, help="Memory of one device, GiB.")
    p.add_argument("--domain-shift", action="store_true", help="The data is from a new domain.")
    p.add_argument("--json", action="store_true", help="Print the response as JSON.")
    p.set_defaults(handler=run)


def _body(args: argparse.Namespace) -> dict[str, Any]:
    adapter: dict[str, Any] = {"type": args.adapter}
    for key in ("r", "alpha", "dropout", "num_virtual_tokens", "quant_type"):
        if getattr(args, key) is not None:
            adapter[key] = getattr(args, key)
    if args.no_double_quant:
        adapter["double_quant"] = False
    if args.target_modules:
        targets = args.target_modules.strip()
        adapter["target_modules"] = (
            targets if targets == "all-linear" else [t.strip() for t in targets.split(",")]
        )
    hp: dict[str, Any] = {}
    for key, name in (
        ("n_epochs", "n_epochs"),
        ("seq_len", "max_seq_length"),
        ("batch_size", "batch_size"),
        ("gradient_accumulation_steps", "gradient_accumulation_steps"),
    ):
        if getattr(args, key) is not None:
            hp[name] = getattr(args, key)
    body: dict[str, Any] = {
        "adapter": adapter,
        "method": args.method,
        "hyperparameters": hp,
        "gradient_checkpointing": args.gradient_checkpointing,
        "domain_shift": args.domain_shift,
    }
    if args.model:
        body["model"] = args.model
    else:
        body["model_config"] = json.loads(args.model_config.read_text())
    for key in ("n_tokens", "n_examples", "dtype"):
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    if args.gpu or args.gpu_memory_gb:
        body["hardware"] = {"gpu": args.gpu, "gpu_memory_gb": args.gpu_memory_gb}
    return body


def _bytes(n: int) -> str:
    return f"{n / GIB:,.2f} GiB"


def render(result: Any) -> str:
    """A readable table of an `EstimateResponse`."""
    adapter = result.adapter
    targets = (
        adapter.target_modules
        if isinstance(adapter.target_modules, str)
        else ",".join(adapter.target_modules)
    )
    rows: list[tuple[str, str]] = [
        ("model", result.model or result.architecture),
        ("adapter", f"{adapter.type} (r={adapter.r}, targets={targets})"),
        ("method", result.method),
        ("trainable params", f"{result.trainable_params:,}"),
        ("total params", f"{result.total_params:,}"),
        ("trainable %", f"{result.trainable_percent:.4f}"),
        ("dtype", result.dtype),
        ("batch x seq", f"{result.batch_size} x {result.seq_len}"),
        ("memory: weights", _bytes(result.memory.weights)),
        ("memory: gradients", _bytes(result.memory.gradients)),
        ("memory: optimizer", _bytes(result.memory.optimizer)),
        ("memory: activations", _bytes(result.memory.activations)),
        ("memory: total", _bytes(result.memory.total)),
        (
            "tokens per epoch",
            "unknown" if result.tokens_per_epoch is None else f"{result.tokens_per_epoch:,}",
        ),
        ("steps", "unknown" if result.steps is None else f"{result.steps:,}"),
        (
            "estimated time",
            "unknown (no measured throughput)"
            if result.estimated_seconds is None
            else f"{result.estimated_seconds:,.0f} s",
        ),
    ]
    if result.hardware is not None:
        memory = "" if result.device_memory_bytes is None else f", {_bytes(result.device_memory_bytes)}"
        fits = {True: "yes", False: "no", None: "unknown"}[result.fits]
        rows.append(("hardware", f"{result.hardware}{memory}"))
        rows.append(("fits", fits))
    rec = result.recommendation
    rows.append(("recommended", f"{' then '.join(rec.stages)} with {rec.adapter}"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    lines += [f"{'why'.ljust(width)}  - {reason}" for reason in rec.reasons]
    lines += [f"{'to fit'.ljust(width)}  - {advice}" for advice in rec.fit_advice]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from tuneforge.estimates import EstimateError, EstimateRequest, estimate

    try:
        request = EstimateRequest.model_validate(_body(args))
        result = estimate(request)
    except ValidationError as exc:
        for error in exc.errors():
            print(f"error: {'.'.join(str(p) for p in error['loc'])}: {error['msg']}", file=sys.stderr)
        return 2
    except EstimateError as exc:
        print(f"error: {exc.param or ''}: {exc.message}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result.model_dump_json(indent=2) if args.json else render(result))
    return 0
