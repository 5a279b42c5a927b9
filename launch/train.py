"""Pretraining launcher.

    python -m launch.train --config=configs/tiny.py --workdir=/tmp/tiny
    python -m launch.train --config=configs/tiny.py --workdir=DIR \
        --config.model.n_routed_experts=16 --config.mesh.expert=4 --config.train.steps=200

Multi-host: pass --coordinator_address/--num_processes/--process_id, or --distributed to let
`jax.distributed.initialize()` auto-detect the platform's cluster. Run again with the same
--workdir to resume from the latest checkpoint.

SIGTERM or Ctrl-C stops the run after its step with a checkpoint, and the launcher then exits
with 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM), as a shell does, so that a
scheduler restarts it; a finished run exits 0 (`mla_moe.train.preemption`).

Compiled programs are kept in a persistent cache (--compilation_cache, default
~/.cache/mla_moe/jax), so a second run of the same setup starts without compiling (on CPU for
one-device runs only: see `mla_moe.train.compilation_cache`).
"""

from __future__ import annotations

import os
import signal
import sys

from absl import flags
from ml_collections import config_flags

from launch import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (get_config()).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and TensorBoard events.")
_PROFILE = flags.DEFINE_string("profile_steps", "",
                                "A:B writes a jax.profiler trace of steps A..B.")
_INIT_HF = flags.DEFINE_string("init_from_hf", "", "Start from a HuggingFace checkpoint dir.")
_COORD = flags.DEFINE_string("coordinator_address", "", "host:port of process 0 (multi-process).")
_NPROC = flags.DEFINE_integer("num_processes", 1, "Number of processes (multi-process).")
_PID = flags.DEFINE_integer("process_id", 0, "This process's index (multi-process).")
_DIST = flags.DEFINE_bool("distributed", False,
                          "Call jax.distributed.initialize() with platform auto-detection.")
_CPU_COLLECTIVES = flags.DEFINE_string(
    "cpu_collectives", "gloo", "Collectives implementation for multi-process CPU runs.")
_CACHE = flags.DEFINE_string(
    "compilation_cache", os.path.join("~", ".cache", "mla_moe", "jax"),
    "Directory of the persistent XLA compilation cache ('' disables it).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    """Sets up distributed JAX if asked, then trains the configured run in the workdir."""
    from mla_moe.errors import InputError

    if not _WORKDIR.value:
        raise InputError("--workdir is empty; pass the directory for checkpoints and metrics")
    if _NPROC.value < 1 or not 0 <= _PID.value < _NPROC.value:
        raise InputError(f"--process_id={_PID.value} must be in [0, --num_processes="
                         f"{_NPROC.value})")
    from mla_moe.train import tpu_flags

    tpu_flags.set_libtpu_flags(_CONFIG.value.model.get("remat_policy", "none"),
                               tpu_flags.generation_from_env())
    import jax

    if _COORD.value or _NPROC.value > 1:
        if jax.config.jax_platforms in (None, "", "cpu") or "cpu" in str(jax.config.jax_platforms):
            jax.config.update("jax_cpu_collectives_implementation", _CPU_COLLECTIVES.value)
        jax.distributed.initialize(_COORD.value or None, _NPROC.value, _PID.value)
    elif _DIST.value:
        jax.distributed.initialize()
    from mla_moe.train.compilation_cache import enable_compilation_cache

    enable_compilation_cache(_CACHE.value)  # off for multi-device CPU runs

    from mla_moe.train import NonFiniteLossError, train

    try:
        result = train(_CONFIG.value, _WORKDIR.value, profile_steps=_PROFILE.value,
                       init_from_hf=_INIT_HF.value)
    except NonFiniteLossError as e:  # an expected stop, not a bug: the message says it all
        cli.fail(str(e))
    if result.exit_status:
        sys.exit(result.exit_status)


def _main(argv: list[str]) -> None:
    """`main`; a Ctrl-C outside `train` (jax starting up) ends it in one line."""
    try:
        main(argv)
    except KeyboardInterrupt:
        print("interrupted by Ctrl-C before training started", file=sys.stderr, flush=True)
        sys.exit(128 + signal.SIGINT)


if __name__ == "__main__":
    cli.run(_main)
