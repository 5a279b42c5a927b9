"""Running a launcher as a user does, and reading what it said.

`user_env()` is the environment of a user's shell: no JAX_PLATFORMS and no simulated devices
(the tests' own process sets both), the repository on PYTHONPATH. The test extra installs
libtpu and jax's CUDA plugin, as a user with the `aot` extra has them; on a machine without
their chips a launcher must still print none of their start-up notices (`launch.startup`):
`lines` keeps every non-blank line, so a test that expects one `error:` line also checks that.
"""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What the plugins print when nothing holds it back (launch.startup.NOISE, and what follows).
PLUGIN_NOISE = re.compile(
    r"Could not find cuda drivers|absl::InitializeLog|Jax plugin configuration error|"
    r"Unable to load CUDA|unexpected worker hostname|Source Location Trace|^E0000 |"
    r"could not determine TPU|InitGoogle", re.M)


def user_env(**extra: str) -> dict[str, str]:
    """os.environ less JAX_PLATFORMS and XLA_FLAGS, with the repository on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.join(ROOT, "src"), ROOT, os.environ.get("PYTHONPATH", "")])
    return {**env, **extra}


def lines(text: str) -> list[str]:
    """The non-blank lines of `text`."""
    return [ln for ln in text.splitlines() if ln.strip()]


def noise(text: str) -> list[str]:
    """The lines of `text` that are accelerator plugins' start-up notices."""
    return [ln for ln in text.splitlines() if PLUGIN_NOISE.search(ln)]
