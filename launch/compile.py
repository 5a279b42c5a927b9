"""Will it fit? Compiles a run's train step (or decode step) for a TPU slice or GPU cluster
from this host, and reports per-device memory against HBM and host RAM, collectives, FLOPs,
and a roofline estimate of the step time (a lower bound from analysis, not a measurement).

    python -m launch.compile --config=configs/deepseek_v3.py --target=tpu:v5p:8x8x8 \
        --config.mesh.expert=8 --config.train.batch_size=1024
    python -m launch.compile --config=configs/deepseek_v2_lite.py --target=gpu:h100:1x1x8
    python -m launch.compile --config=configs/small.py --target=tpu:tpu7x:2x2x1 \
        --config.train.batch_size=8
    python -m launch.compile --config=configs/deepseek_v3.py --target=tpu:v5p:8x8x8 \
        --what=decode --cache_length=32768 --json=/tmp/v3_decode.json

Same `--config` and `--config.*` overrides as launch.train. Nothing is allocated and no data
is read. Exit code: 0 fits, 3 does not fit (the compiler's peak exceeds HBM, it ran out of
memory, or the step's host-memory buffers exceed the host's RAM), 1 bad input.
"""

from __future__ import annotations

import os

# Compile-only devices: the host's backend stays the CPU, so neither the CUDA plugin nor libtpu
# look for hardware. This must precede the first `import jax` (launch.cli starts it).
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import contextlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from launch import cli, startup  # noqa: E402
from mla_moe.errors import InputError  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (get_config()).",
                                          lock_config=True)
_TARGET = flags.DEFINE_string(
    "target", None, "tpu:GEN:TOPOLOGY (GEN: v4, v5e, v5p, v6e, tpu7x (Ironwood, 2 devices per "
    "chip); e.g. tpu:v5p:8x8x8, tpu:tpu7x:2x2x1) or gpu:NAME:PxHxG (NAME: a100, h100, h200; "
    "partitions x hosts x GPUs per host).")
_SLICES = flags.DEFINE_integer("num_slices", 1, "TPU slices (multislice).")
_WHAT = flags.DEFINE_enum("what", "train", ["train", "decode"],
                          "train: the trainer's train step; decode: one absorbed decode step.")
_CACHE = flags.DEFINE_integer("cache_length", 0,
                              "decode: cache length (0: model.max_position_embeddings).")
_DECODE_BATCH = flags.DEFINE_integer("decode_batch", 0,
                                     "decode: sequences (0: one per batch shard).")
_JSON = flags.DEFINE_string("json", "", "Also write the report as JSON to this path.")
_SAVE = flags.DEFINE_string("save", "", "Serialize the compiled executable to this path.")
_HLO = flags.DEFINE_string("hlo", "", "Write the optimized HLO text to this path (gzip if it "
                           "ends in .gz), for bench/hlo_bound.py.")
flags.mark_flags_as_required(["config", "target"])

EXIT_DOES_NOT_FIT = 3


# The modules that give jax each target's compiler: libtpu, the CUDA plugin (CUDA 12 or 13).
_COMPILERS = {"tpu": ("libtpu",), "gpu": ("jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13")}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent that is not a package, or a stub module
        return False


def parse_target():
    """The --target, checked before any compiling: its syntax, and that this Python has the
    compiler for its platform."""
    from pallas_kernels import targets

    try:
        target = targets.parse_target(_TARGET.value, _SLICES.value)
    except ValueError as e:  # "target 'tpu:v9:2x2x1': ..." or "num_slices=2: ...": the flag's
        raise InputError(f"--{e}") from None
    if not any(_installed(m) for m in _COMPILERS[target.platform]):
        what = "libtpu" if target.platform == "tpu" else "jax's CUDA plugin"
        raise InputError(f"--target={_TARGET.value}: compiling for {target.platform.upper()}s "
                         f"needs {what}; install the aot extra: pip install -e '.[aot]'")
    return target


def main(argv: list[str]) -> None:
    """Compiles the configured step for the target and prints (or writes) its report."""
    target = parse_target()
    from jax.errors import JaxRuntimeError

    from mla_moe.train import aot, tpu_flags
    from pallas_kernels import targets

    if target.platform == "tpu":  # before libtpu starts (the topology below)
        tpu_flags.set_libtpu_flags(_CONFIG.value.model.get("remat_policy", "none"), target.chip)
    # Opening a compile-only topology on a host without the chips starts their runtime, which
    # logs that it found none (libtpu's host-bounds and worker-hostname lines): held back.
    verbose = flags.FLAGS["verbosity"].present
    with contextlib.nullcontext() if verbose else startup.held_stderr():
        try:
            devices = targets.devices(target)
        except JaxRuntimeError as e:  # a topology the chip cannot form, e.g. v5p:3x1x1
            if "INVALID_ARGUMENT" not in str(e):
                raise
            raise InputError(f"--target={_TARGET.value}: {str(e).splitlines()[0]}") from None
    try:
        if _WHAT.value == "train":
            report, compiled = aot.compile_train(_CONFIG.value, devices, target=str(target))
        else:
            report, compiled = aot.compile_decode(
                _CONFIG.value, devices, cache_length=_CACHE.value, batch=_DECODE_BATCH.value,
                target=str(target))
    except InputError:
        raise
    except ValueError as e:  # the run's sizes against the target's mesh, naming the field
        raise InputError(str(e)) from None
    print(report.text(), flush=True)
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(report.to_json(), f, indent=2)
    if _HLO.value and compiled is not None:
        import gzip

        opener = gzip.open if _HLO.value.endswith(".gz") else open
        with opener(_HLO.value, "wt") as f:
            f.write(compiled.as_text())
    if _SAVE.value and compiled is not None:
        aot.save(compiled, _SAVE.value)
        print(f"saved the compiled executable to {_SAVE.value}", flush=True)
    if not report.fits:
        sys.exit(EXIT_DOES_NOT_FIT)


if __name__ == "__main__":
    cli.run(main)
