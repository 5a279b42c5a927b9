"""Pretraining launcher.

    python -m launch.train --config=configs/tiny.py --workdir=/tmp/tiny
    python -m launch.train --config=configs/tiny.py --workdir=DIR \
        --config.model.n_routed_experts=16 --config.mesh.expert=4 --config.train.steps=200

Multi-host: pass --coordinator_address/--num_processes/--process_id, or --distributed to let
`jax.distributed.initialize()` auto-detect the platform's cluster. Run again with the same
--workdir to resume from the latest checkpoint.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

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
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # keep stdout to the progress lines
    import jax

    if _COORD.value or _NPROC.value > 1:
        if jax.config.jax_platforms in (None, "", "cpu") or "cpu" in str(jax.config.jax_platforms):
            jax.config.update("jax_cpu_collectives_implementation", _CPU_COLLECTIVES.value)
        jax.distributed.initialize(_COORD.value or None, _NPROC.value, _PID.value)
    elif _DIST.value:
        jax.distributed.initialize()

    from mla_moe.train import (
        ConfigError,
        IncompatibleWorkdirError,
        NonFiniteLossError,
        train,
    )

    try:
        train(_CONFIG.value, _WORKDIR.value, profile_steps=_PROFILE.value,
              init_from_hf=_INIT_HF.value)
    except (ConfigError, IncompatibleWorkdirError, NonFiniteLossError, FileNotFoundError,
            FileExistsError, ValueError) as e:
        # One line naming the cause; the traceback adds nothing for bad input.
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
