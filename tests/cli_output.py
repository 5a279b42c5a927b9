"""What a command-line tool said, less the start-up lines of the compile-only CUDA plugin.

The test extra installs jax's CUDA plugin (to compile for GPUs); loading it prints, from native
code and whatever JAX_PLATFORMS says, "Could not find cuda drivers" preceded by absl's
"log messages before absl::InitializeLog()" notice. A plain install has no such lines.
"""

import re

_PLUGIN_NOISE = re.compile(
    r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to "
    r"STDERR$|^[IW]\d{4} [\d:. ]+\d+ cudart_stub\.cc:\d+\] ")


def lines(text: str) -> list[str]:
    """The non-blank lines of `text` that are not the CUDA plugin's start-up notices."""
    return [ln for ln in text.splitlines() if ln.strip() and not _PLUGIN_NOISE.match(ln)]
