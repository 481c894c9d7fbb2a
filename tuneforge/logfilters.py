"""Log records of libraries that say nothing useful in our processes, dropped precisely.

bitsandbytes, on a CPU with AVX-512 BF16, tries at import to fetch a faster 4-bit matmul from the
Hugging Face Hub (`kernels.get_kernel("kernels-community/...")`) and warns when it cannot. The
`kernels` package would download that code at run time, which a worker must not do (and cannot,
offline); without it bitsandbytes uses its own CPU implementation. So that one warning is dropped,
and every other record of that logger still goes through.
"""

from __future__ import annotations

import logging

BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_KERNELS_WARNING = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(self.prefix))


def install() -> None:
    """Idempotent; runs when `tuneforge` is imported, before anything imports bitsandbytes."""
    logger = logging.getLogger(BNB_CPU_LOGGER)
    if not any(isinstance(f, _DropMessage) and f.prefix == BNB_KERNELS_WARNING for f in logger.filters):
        logger.addFilter(_DropMessage(BNB_KERNELS_WARNING))
