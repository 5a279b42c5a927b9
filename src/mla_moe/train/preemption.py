"""Preemption: SIGTERM/SIGINT ask the loop to finish its step, save a checkpoint and return.

With several processes every one must stop at the same step (a save is collective), so the
flag is all-gathered: any process that received a signal stops them all.
"""

from __future__ import annotations

import signal

import jax
import numpy as np


class StopSignal:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, saves and returns."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = {}
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def stop_requested(flag: bool) -> bool:
    """Whether any process has `flag` set (this process's own flag with one process)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))
