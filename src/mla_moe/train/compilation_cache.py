"""The persistent XLA compilation cache, kept off where its programs are unsafe to reload.

XLA:CPU programs that run collectives over several devices can deadlock when they are loaded
back from the cache: the V3 `runlocal` train step over 8 CPU devices, compiled once and reloaded,
hangs on its first step with device 0 waiting in an all-gather while the other seven wait in a
later all-reduce (XLA's collective timeout then aborts the process). The freshly compiled
program runs. So on CPU the cache is used only by one-device runs; TPU and GPU keep it.
"""

from __future__ import annotations

import os

import jax
from absl import logging

__all__ = ["cache_is_safe", "disable_where_unsafe", "enable_compilation_cache"]


def cache_is_safe(devices: int | None = None) -> bool:
    """Whether programs over `devices` devices (default: all of this job's) may be reloaded."""
    devices = jax.device_count() if devices is None else devices
    return jax.default_backend() != "cpu" or devices == 1


def enable_compilation_cache(path: str, *, min_compile_time_secs: float = 1.0,
                             min_entry_size_bytes: int | None = None) -> str | None:
    """Keeps compiled programs in `path` (a directory set through JAX_COMPILATION_CACHE_DIR
    wins), so a rerun or resume of the same setup skips compiling. Returns the directory in
    use, or None where the cache is off: `path` empty and none set, a directory that cannot be
    created, or a multi-device CPU job (see the module docstring)."""
    if not cache_is_safe():
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    if jax.config.jax_compilation_cache_dir:  # set by the environment
        return jax.config.jax_compilation_cache_dir
    if not path:
        return None
    path = os.path.expanduser(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None  # a read-only home: run without the cache
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time_secs)
    if min_entry_size_bytes is not None:
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", min_entry_size_bytes)
    return path


def disable_where_unsafe(devices: int) -> bool:
    """Turns the persistent cache off for this process if it is on and programs over `devices`
    devices are unsafe to reload. Returns whether it did."""
    enabled = jax.config.jax_compilation_cache_dir and jax.config.jax_enable_compilation_cache
    if not enabled or cache_is_safe(devices):
        return False
    logging.warning("the persistent compilation cache is off for this process: XLA:CPU programs "
                    "with collectives over %d devices can deadlock when reloaded from it", devices)
    jax.config.update("jax_enable_compilation_cache", False)
    return True
