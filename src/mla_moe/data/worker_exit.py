"""Grain worker processes that end when the process that started them is gone.

A raw source's tokenizing workers (`raw_source.raw_windows`, `data.workers > 0`) are spawned
by Grain and stop when the training process closes its iterator. A training process killed
with SIGKILL closes nothing: its workers would wait forever on their full output queues (and
Python's resource tracker with them). Each worker therefore runs `exit_with_parent` first,
as Grain's `worker_init_fn`: a daemon thread that ends the worker once its parent process
has exited (its parent pid changes when it is re-parented).

Not `prctl(PR_SET_PDEATHSIG)`: that signal follows the *thread* that started the process, and
Grain may start its workers from a prefetch thread that ends (and restarts) on a restore.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable

POLL_S = 0.2  # how often a worker checks its parent: it ends within this of the parent's death


def exit_with_parent(parent_pid: int, worker_index: int = 0, worker_count: int = 1) -> None:
    """Starts a daemon thread that ends this process (exit status 1, nothing flushed) as soon
    as its parent is no longer `parent_pid`. Grain calls it with the worker's index and
    count."""
    del worker_index, worker_count

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def worker_init_fn() -> Callable[[int, int], None]:
    """Grain's `worker_init_fn` for workers spawned by this process."""
    return functools.partial(exit_with_parent, os.getpid())
