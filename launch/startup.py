"""How a launcher starts jax: on this host's accelerator, without the start-up notices of the
plugins for accelerators the host lacks.

With the `aot` (or `test`) extra installed, jax finds libtpu and the CUDA plugin. On a host with
neither chip, starting them prints about 25 harmless but alarming lines: "Could not find cuda
drivers" from the CUDA plugin's native code (each time one of its libraries loads, whatever
JAX_PLATFORMS says), a "Jax plugin configuration error ... Unable to load CUDA" traceback and
libtpu's "unexpected worker hostname" E-line (when jax tries every platform), and, when
`launch.compile` opens a compile-only TPU topology, libtpu's notices that it found no TPU.

`start()`, which `launch.cli` runs before anything imports jax:
- selects the CPU platform (`jax_platforms`) when JAX_PLATFORMS is unset and the host has no
  TPU or GPU device file: jax would fall back to its CPU anyway, after failing on the others.
  It sets jax's config, not the environment, so that commands a launcher starts (sbatch, a
  trainer on a pod's hosts) choose their own platform;
- imports jax and registers its plugins with the process's stderr held (`held_stderr`), then
  writes back every line held except the notices above (`NOISE`): a real error still shows.

`--verbosity` (or `-v`) turns all of this off: jax starts as it would without this module.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import sys
import tempfile
from collections.abc import Iterator

# Device files of the accelerators jax drives: TPU (v4 and v5p: /dev/accel*; v5e and later:
# VFIO groups), NVIDIA GPUs (and WSL's), AMD GPUs.
_DEVICE_FILES = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidiactl", "/dev/nvidia[0-9]*",
                 "/dev/dxg", "/dev/kfd")

# Native start-up notices of plugins for accelerators the host lacks, one pattern per line.
NOISE = re.compile("|".join([
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$",
    r"WARNING: Logging before InitGoogle\(\) is written to STDERR$",
    r"[IW]\d{4} [\d:. ]+\d+ cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine",
    r"Failed to find host bounds for accelerator type: WARNING: could not determine TPU "
    r"accelerator type",
    r"E\d{4} [\d:. ]+\d+ common_lib\.cc:\d+\] INVALID_ARGUMENT: Error: unexpected worker "
    r"hostname 'WARNING: could not determine TPU worker hostnames",
]))
# The lines that follow such an E-line: its source location trace.
_TRACE = re.compile(r"=== Source Location Trace: ===\s*$|[\w./-]+\.cc:\d+\s*$")


def verbose(argv: list[str]) -> bool:
    """Whether `argv` sets absl's verbosity (`--verbosity=N`, `-v N`, ...)."""
    return any(re.fullmatch(r"--?(verbosity|v)(=.*)?", arg) for arg in argv[1:])


def has_accelerator() -> bool:
    """Whether this host has a TPU or GPU device file (cheap: no driver is loaded)."""
    return any(glob.glob(pattern) for pattern in _DEVICE_FILES)


def without_noise(text: str) -> str:
    """`text` less the lines `NOISE` matches (and the source trace after a matched line)."""
    kept, dropping = [], False
    for line in text.splitlines(keepends=True):
        dropping = bool(NOISE.match(line) or (dropping and _TRACE.match(line)))
        if not dropping:
            kept.append(line)
    return "".join(kept)


@contextlib.contextmanager
def held_stderr() -> Iterator[None]:
    """Holds everything written to file descriptor 2 (native code's and Python's) while the
    block runs, then writes it back less `NOISE`, also when the block raises."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = without_noise(held.read().decode(errors="replace"))
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


def start(argv: list[str]) -> None:
    """Chooses the platform and imports jax quietly (see the module docstring). Does nothing
    when jax is already imported (too late to choose) or `argv` sets --verbosity."""
    if "jax" in sys.modules or verbose(argv):
        return
    with held_stderr():
        import jax

        if not os.environ.get("JAX_PLATFORMS") and not has_accelerator():
            jax.config.update("jax_platforms", "cpu")
        if jax.config.jax_platforms == "cpu":
            # Registering the plugins loads the CUDA plugin's library, which logs once more;
            # jax does it when the first backend starts, which may only come after
            # jax.distributed.initialize. Registering starts no backend (nor libtpu, which jax
            # loads with the TPU backend), so it is done here, where the notice is held.
            from jax._src import xla_bridge

            register = getattr(xla_bridge, "_discover_and_register_pjrt_plugins", None)
            if register is not None:
                register()
