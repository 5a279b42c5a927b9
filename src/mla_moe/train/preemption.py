"""Stopping on a signal without losing the run.

SIGTERM (a preempted host, a scheduler's time limit) and Ctrl-C (SIGINT) ask the loop to
finish its step, save a checkpoint and return; the launcher then exits with 128 + the signal's
number, as a shell reports a process the signal ended, so that a script, SLURM or a JobSet can
tell a stopped run (to restart: it resumes from that checkpoint) from a finished one (0).

Ctrl-C again escalates, and never leaves the workdir without a complete checkpoint: while a
save is being written it waits for it and starts no other (one line says so), a third Ctrl-C
abandons that save (the previous complete checkpoint stays the latest); with no save in flight
it stops at once. (With several processes the stop step's save is still written: a save is
collective, and one process's Ctrl-C cannot skip it for the others.) A Ctrl-C is handled when
Python next runs: not in the middle of a compile or a step. Stopping at once ends the process
(exit status 130), also when `train` runs inside another program such as a notebook.
A repeated SIGTERM changes nothing: the run is already stopping.

With several processes every one must stop at the same step (a save is collective), so the
signal is all-gathered: any process that received one stops them all, and all exit with it.
"""

from __future__ import annotations

import os
import signal

import jax
import numpy as np

NAMES = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}


def exit_status(signum: int | None) -> int:
    """A process's exit status after stopping on `signum` (None: it finished): 128 + the
    signal's number, as shells report it (130 for SIGINT, 143 for SIGTERM)."""
    return 0 if signum is None else 128 + int(signum)


def _say(line: str) -> None:
    # os.write, not print: a handler can run in the middle of a print to the same stream.
    os.write(2, (line + "\n").encode())


class StopSignal:
    """While active, SIGTERM/SIGINT set `received` (the first signal's number) and the loop
    finishes its step, saves and returns. Set `checkpointer` (a `checkpoint.Checkpointer`) once
    the workdir is open: a second Ctrl-C then knows whether a save is in flight."""

    def __init__(self, *, verbose: bool = True):
        self.received: int | None = None
        self.hurry = False  # Ctrl-C again: save nothing more, only finish the save in flight
        self.checkpointer = None
        self._verbose = verbose
        self._waiting = False
        self._previous = {}

    def __enter__(self):
        try:
            for sig in NAMES:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = {}
        return self

    def _handle(self, signum, frame):
        if self.received is None:
            self.received = signum
            if self._verbose:
                again = " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""
                _say(f"{NAMES[signum]}: stopping after this step with a checkpoint{again}")
            return
        if signum != signal.SIGINT:
            return  # already stopping; the scheduler's SIGKILL, if any, comes later
        ckpt = self.checkpointer
        writing = ckpt.in_flight() if ckpt is not None else None
        kept = ckpt.committed if ckpt is not None else None
        kept_text = f"step {kept}" if kept is not None else "none yet"
        if writing is not None and not self._waiting:
            self._waiting = self.hurry = True
            _say(f"Ctrl-C: waiting for checkpoint step {writing} to finish writing (Ctrl-C "
                 f"again to abandon it; the latest complete checkpoint is {kept_text})")
            return
        if writing is not None:
            _say(f"Ctrl-C: abandoning checkpoint step {writing}; the latest complete "
                 f"checkpoint is {kept_text}")
        else:
            _say(f"Ctrl-C: stopping now; the latest complete checkpoint is {kept_text}")
        # Every file of the workdir is safe to cut here: checkpoints are renamed into place
        # when complete, metrics rows and TensorBoard records past the checkpoint are dropped
        # on resume.
        os._exit(exit_status(signal.SIGINT))

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def stop_signal(received: int | None) -> int | None:
    """The signal any process received (this process's own with one process), or None."""
    if jax.process_count() == 1:
        return received
    from jax.experimental import multihost_utils

    signums = multihost_utils.process_allgather(np.int32(received or 0))
    return int(np.max(signums)) or None
