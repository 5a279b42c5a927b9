"""The bundled default corpus (reading and tokenizing other corpora: `prepare_store`).

The default corpus is the Python standard library's own source (every machine with Python has
it; no network, no licence question beyond the PSF licence of the files themselves, which are
not redistributed). It is tokenized with the byte tokenizer on first use and cached.
"""

from __future__ import annotations

import glob
import os
import sys
import sysconfig

import numpy as np

from mla_moe.data import token_store
from mla_moe.errors import InputError

DEFAULT_CORPUS_VERSION = 1


def split_documents(docs: list[np.ndarray],
                    val_fraction: float) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Every round(1/val_fraction)-th document goes to validation (at least one); a corpus of a
    single document gives its tail instead."""
    if not 0 < val_fraction < 1:
        raise InputError(f"--val_fraction must be in (0, 1), got {val_fraction}")
    docs = [d for d in docs if d.size]
    if not docs:
        raise InputError("--input has no text (every document is empty)")
    if len(docs) == 1:
        cut = max(1, int(docs[0].size * (1 - val_fraction)))
        if cut >= docs[0].size:
            raise InputError("--input is too small to hold out a validation split; give "
                             "more text or a larger --val_fraction")
        return [docs[0][:cut]], [docs[0][cut:]]
    every = max(2, min(round(1 / val_fraction), len(docs)))
    train = [d for i, d in enumerate(docs) if i % every != every - 1]
    val = [d for i, d in enumerate(docs) if i % every == every - 1]
    return train, val


def cache_dir() -> str:
    """Where the default corpus is cached: $MLA_MOE_CACHE, else $XDG_CACHE_HOME/mla_moe, else
    ~/.cache/mla_moe."""
    root = os.environ.get("MLA_MOE_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "mla_moe")
    return root


def _stdlib_files_all() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    skip = ("site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3")
    out = []
    for path in glob.glob(os.path.join(root, "**", "*.py"), recursive=True):
        parts = os.path.relpath(path, root).split(os.sep)
        if not any(p in skip for p in parts[:-1]):
            out.append(path)
    return sorted(out)


def _stdlib_files() -> list[str]:
    return _stdlib_files_all()


def default_corpus(val_fraction: float = 0.01) -> str:
    """Path of the default token store (Python stdlib source, byte tokens), built if missing."""
    v = sys.version_info
    path = os.path.join(
        cache_dir(), f"stdlib-py{v.major}{v.minor}-byte-v{DEFAULT_CORPUS_VERSION}"
    )
    if os.path.isfile(os.path.join(path, "metadata.json")):
        return path
    docs = []
    for p in _stdlib_files():
        with open(p, "rb") as f:
            data = f.read()
        if data:
            docs.append(np.frombuffer(data, np.uint8))
    train, val = split_documents(docs, val_fraction)
    try:
        token_store.write_store(
            path, {"train": train, "val": val}, tokenizer="byte", vocab_size=256,
            source="python-stdlib:" + sysconfig.get_paths()["stdlib"],
        )
    except (FileExistsError, OSError):
        # Another process built it concurrently; its rename won. Use theirs if complete.
        if not os.path.isfile(os.path.join(path, "metadata.json")):
            raise
    return path
