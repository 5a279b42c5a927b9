"""Optional libraries: each format or tokenizer that needs one names the extra that installs it.

    pyarrow = extras.require("pyarrow", "reading .parquet files")

`pip install -e .` stays light; `pip install -e '.[data]'` brings pyarrow, zstandard,
tokenizers and sentencepiece (ArrayRecord comes with grain).
"""

from __future__ import annotations

import importlib
import types

from mla_moe.errors import InputError

EXTRA = "data"


def require(module: str, purpose: str) -> types.ModuleType:
    """The module `module`, or an InputError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise InputError(
            f"{purpose} needs the `{package}` package: pip install 'mla-moe[{EXTRA}]' "
            f"(or pip install {package})"
        ) from None
