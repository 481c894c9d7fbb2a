"""bitsandbytes' warning about the missing `kernels` package is dropped in every process that
imports tuneforge, and nothing else of that logger is.

This machine's CPU may lack AVX-512 BF16, where bitsandbytes never tries the Hub kernel; the probe
makes bitsandbytes believe it has it, so that the warning is really emitted."""

from __future__ import annotations

import subprocess
import sys

from tuneforge.logfilters import BNB_CPU_LOGGER, BNB_KERNELS_WARNING

PROBE = f"""
import importlib.abc, importlib.util, logging, sys


class ClaimAvx512Bf16(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "{BNB_CPU_LOGGER}":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            sys.modules["bitsandbytes.functional"].has_avx512bf16 = lambda: True
            run(module)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, ClaimAvx512Bf16())
if sys.argv[1] == "with-tuneforge":
    import tuneforge
import bitsandbytes

logging.getLogger("{BNB_CPU_LOGGER}").warning("another warning of that logger")
"""


def _stderr(mode: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_kernels_warning_is_dropped_and_nothing_else() -> None:
    before = _stderr("without-tuneforge")
    assert BNB_KERNELS_WARNING in before  # the probe does make bitsandbytes warn
    after = _stderr("with-tuneforge")
    assert BNB_KERNELS_WARNING not in after
    assert "another warning of that logger" in after
