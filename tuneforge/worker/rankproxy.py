"""A rank's stand-in for torchrun: `python -m tuneforge.worker.rankproxy ARGS` is what torchrun
starts per rank (tuneforge/worker/launcher.py) where the worker has a fork server. It imports
nothing heavy: it asks the fork server (tuneforge/worker/forkserver.py) for the rank, `python -m
tuneforge.worker.child ARGS` with this process's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...),
directory and stdio, passes on the signals torchrun sends, and exits as the rank did (by the same
signal, if a signal ended it), so torchrun sees the rank's life and end as its own child's. The
rank SIGKILLs itself when this process ends, so ending torchrun's process group ends it too.

Without a server (none started, or it stepped aside) this process becomes the rank itself: it
execs a fresh interpreter with the same pid.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import Any

from tuneforge.worker import forkserver

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def main(argv: list[str]) -> int:
    args = argv[1:]
    rank = forkserver.fork_rank(args)
    if rank is None:
        os.execv(sys.executable, [sys.executable, "-m", "tuneforge.worker.child", *args])

    def forward(signum: int, _frame: Any) -> None:
        rank.send_signal(signum)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    code = rank.wait()
    if code < 0:  # ended by a signal: end by it too
        with contextlib.suppress(OSError, ValueError):  # SIGKILL's cannot be set: it is the default
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        return 128 - code  # a signal whose default is not to end a process, as a shell reports it
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
