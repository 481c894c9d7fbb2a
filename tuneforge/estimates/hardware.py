"""Hardware classes: device memory, and the training throughput we measured on them.

Only figures we measured ourselves go in `THROUGHPUT`; a class or model size without one gives
`estimated_seconds: null`. Add a row after measuring with bench/estimate_bench.py --throughput
(or a real job's tokens_per_second) on that class.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30

#: Memory of one device in GiB, as the vendors name the class (the usable part is a little less:
#: see `RESERVE_*`).
DEVICE_MEMORY_GIB: dict[str, float] = {
    "h200": 141,
    "h100-80gb": 80,
    "h100": 80,
    "a100-80gb": 80,
    "a100-40gb": 40,
    "l40s": 48,
    "a6000": 48,
    "a10g": 24,
    "l4": 24,
    "rtx4090": 24,
    "rtx3090": 24,
    "v100-32gb": 32,
    "v100-16gb": 16,
    "t4": 16,
}

RESERVE_FIXED_BYTES = GIB // 2  # CUDA context and kernels
RESERVE_FRACTION = 0.05  # caching-allocator fragmentation


@dataclass(frozen=True)
class Measured:
    hardware: str
    model: str
    total_params: int  # of the base model, adapters not counted
    peft: bool  # an adapter run (frozen base) rather than full fine-tuning
    tokens_per_second: float
    how: str


#: tokens/s of real (non-padding) tokens, one device, measured on this project's machines.
THROUGHPUT: tuple[Measured, ...] = (
    Measured(
        "cpu",
        "tuneforge/tiny-chat",
        2_885_888,
        False,
        540.0,
        "tiny-chat full fine-tuning through the training recipe (TRL), fp32, batch 8 x 512, best of 3 "
        "on 2 shared x86 cores (bench/estimate_bench.py --throughput, 2026-11-28)",
    ),
    Measured(
        "cpu",
        "tuneforge/tiny-chat",
        2_885_888,
        True,
        730.0,
        "tiny-chat LoRA r=16 all-linear through the training recipe (TRL), fp32, batch 8 x 512, best "
        "of 3 on 2 shared x86 cores (bench/estimate_bench.py --throughput, 2026-11-28)",
    ),
)


def find_throughput(hardware: str, total_params: int, peft: bool) -> Measured | None:
    """A measurement on this class for a model within a factor of two in size, same kind of run."""
    best: Measured | None = None
    for row in THROUGHPUT:
        if row.hardware != hardware or row.peft != peft:
            continue
        ratio = total_params / row.total_params
        if 0.5 <= ratio <= 2 and (
            best is None or abs(row.total_params - total_params) < abs(best.total_params - total_params)
        ):
            best = row
    return best


def usable_bytes(device_bytes: int, is_gpu: bool) -> int:
    if not is_gpu:
        return device_bytes
    return max(int(device_bytes * (1 - RESERVE_FRACTION)) - RESERVE_FIXED_BYTES, 0)
