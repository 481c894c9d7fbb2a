"""Out-of-memory recovery: the ladder a job climbs when its training process runs out of device
memory, and the estimator's advice when the ladder ends.

After an out-of-memory error the job's run starts again in a fresh training process, from its
last stored checkpoint (or the start), first with half the micro-batch and twice the gradient
accumulation (the same examples per optimizer step, unlike `auto_find_batch_size`), then with
gradient checkpointing on as well; after that the job fails with `out_of_memory` and what the
estimator (tuneforge/estimates/advisor.py) says would fit. Each rung is an event; none counts as
a failed attempt. The ladder lives in one run of the job: a later attempt starts at the bottom.

`advice` runs in the training process (it knows the device); the rest in the worker.
"""

from __future__ import annotations

import copy
import logging
import re
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

OUT_OF_MEMORY = "out_of_memory"
MAX_ACCUMULATION = 1024  # tuneforge.models.spec.Hyperparameters.gradient_accumulation_steps
ADVICE_SHOWN = 2


@dataclass(frozen=True)
class MemoryPlan:
    """How a run of the job is shaped for memory. `micro_batch`/`accumulation` None: as the job
    says (its effective values once the run reported them)."""

    micro_batch: int | None = None
    accumulation: int | None = None
    gradient_checkpointing: bool = False
    halved: bool = False


def _halve(micro: int) -> int:
    """The largest divisor of `micro` that is at most half of it, so that the examples per
    optimizer step stay exactly the same (a micro-batch of 6 becomes 3, of 5 becomes 1)."""
    return max(d for d in range(1, micro // 2 + 1) if micro % d == 0)


def next_plan(current: MemoryPlan, effective: dict[str, Any]) -> tuple[MemoryPlan, str] | None:
    """The rung after an out-of-memory error under `current`, and the event that says so; None
    when the ladder is spent. `effective` holds the hyperparameters the run reported (empty when
    it failed before reporting them)."""
    micro = current.micro_batch or effective.get("batch_size")
    accumulation = current.accumulation or effective.get("gradient_accumulation_steps") or 1
    if not current.halved and isinstance(micro, int) and micro > 1:
        half = _halve(micro)
        more = accumulation * (micro // half)
        if more <= MAX_ACCUMULATION:
            text = (
                f"Out of memory with micro-batch {micro}: retrying with micro-batch {half} and "
                f"gradient_accumulation_steps {more} (the same {half * more} examples per step)"
            )
            return MemoryPlan(half, more, current.gradient_checkpointing, halved=True), text
    if not current.gradient_checkpointing:
        shape = f"micro-batch {micro}" if isinstance(micro, int) else "its micro-batch"
        text = f"Out of memory with {shape}: retrying with gradient checkpointing"
        known = isinstance(micro, int)  # pinned, so the failure can say what was tried
        plan = MemoryPlan(micro if known else None, accumulation if known else None, True, halved=True)
        return plan, text
    return None


def retry_spec(spec: dict[str, Any], plan: MemoryPlan, effective: dict[str, Any]) -> dict[str, Any]:
    """The job's spec for a run under `plan`: its micro-batch and accumulation, and the values
    that "auto" resolved from the first run's batch pinned, so the run is the same run."""
    spec = copy.deepcopy(spec)
    method = spec["method"]["type"]
    hp = spec["method"][method]["hyperparameters"]
    if plan.micro_batch is not None and plan.accumulation is not None:
        hp["batch_size"] = plan.micro_batch
        hp["gradient_accumulation_steps"] = plan.accumulation
    for name in ("n_epochs", "save_every_steps", "learning_rate_multiplier"):
        if isinstance(effective.get(name), (int, float)) and not isinstance(effective.get(name), bool):
            hp[name] = effective[name]
    return spec


def exhausted_message(plan: MemoryPlan, advice: list[str]) -> str:
    """The failed job's message: what was tried, and what would fit."""
    tried = []
    if plan.micro_batch is not None:
        tried.append(f"micro-batch {plan.micro_batch}")
    if plan.gradient_checkpointing:
        tried.append("gradient checkpointing")
    text = "out of device memory" + (f" even with {' and '.join(tried)}" if tried else "")
    shown = [line.rstrip(".") for line in advice[:ADVICE_SHOWN] if line.strip()]
    return text + (f"; to fit: {'; '.join(shown)}" if shown else "")


def _generic_advice(adapter_type: str, max_seq_length: int) -> list[str]:
    advice = []
    if adapter_type in ("lora", "dora"):
        advice.append(f"use qlora instead of {adapter_type}")
    elif adapter_type == "full":
        advice.append("use qlora instead of full fine-tuning")
    advice.append(f"a shorter max_seq_length (now {max_seq_length})")
    advice.append("a device with more memory or a smaller model")
    return advice


_FIT_NOTE = re.compile(r": [\d.,]+ GiB \(fits [\d.,]+ GiB usable\)$")


def advice(spec_json: dict[str, Any], gradient_checkpointing: bool) -> list[str]:
    """What the estimator says would fit, for the run that just ran out of memory (called in the
    training process). On a GPU: changes that fit its memory, with their sizes. Without one (or
    when the estimate thinks the run fits), changes that make the run smaller than it is, without
    sizes. Never raises: a model the estimator cannot build gets general advice."""
    from tuneforge.models.spec import JobSpec

    spec = JobSpec.model_validate(spec_json)
    hp = spec.method.hyperparameters
    try:
        return _estimated_advice(spec, gradient_checkpointing) or _generic_advice(
            spec.adapter.type, hp.max_seq_length
        )
    except Exception as error:  # advice is a courtesy; the failure is reported either way
        log.warning("no estimate for the out-of-memory advice: %s", error)
        return _generic_advice(spec.adapter.type, hp.max_seq_length)


def _estimated_advice(spec: Any, gradient_checkpointing: bool) -> list[str]:
    import torch

    from tuneforge.estimates.calculator import estimate
    from tuneforge.estimates.hardware import GIB
    from tuneforge.estimates.schema import EstimateRequest

    hp = spec.method.hyperparameters
    cuda = torch.cuda.is_available()
    body: dict[str, Any] = {
        "model": spec.model,
        "adapter": spec.adapter.model_dump(mode="json"),
        "method": spec.method.type,
        "hyperparameters": {
            "batch_size": hp.batch_size,
            "gradient_accumulation_steps": hp.gradient_accumulation_steps,
            "max_seq_length": hp.max_seq_length,
        },
        "gradient_checkpointing": gradient_checkpointing,
    }
    if cuda:
        body["hardware"] = {"gpu_memory_gb": torch.cuda.get_device_properties(0).total_memory / GIB}
    else:
        body |= {"hardware": {"gpu": "cpu"}, "dtype": "fp32"}
    first = estimate(EstimateRequest.model_validate(body))
    if first.recommendation.fit_advice and cuda:
        return list(first.recommendation.fit_advice)
    # The estimate thinks the run fits (or knows no device size): ask which changes make the run
    # smaller than it is, as if the device held just under its estimated total.
    body["hardware"] = {"gpu_memory_gb": (first.memory.total - 1) / GIB, **({} if cuda else {"gpu": "cpu"})}
    body["dtype"] = first.dtype
    smaller = estimate(EstimateRequest.model_validate(body)).recommendation.fit_advice
    return [_FIT_NOTE.sub("", line) for line in smaller if "no single change fits" not in line]
