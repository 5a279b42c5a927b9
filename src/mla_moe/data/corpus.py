"""Text corpora: reading documents, tokenizing them into a token store, and the bundled default.

The default corpus is the Python standard library's own source (every machine with Python has
it; no network, no licence question beyond the PSF licence of the files themselves, which are
not redistributed). It is tokenized with the byte tokenizer on first use and cached.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import sysconfig
from collections.abc import Iterator

import numpy as np

from mla_moe.data import token_store
from mla_moe.data.tokenizer import load_tokenizer
from mla_moe.errors import InputError, MissingInputError

DEFAULT_CORPUS_VERSION = 1


def iter_documents(input_pattern: str, text_key: str = "text") -> Iterator[str]:
    """Documents from a glob of text files (one document per file) or `.jsonl` files (one per
    line, text under `text_key`). Files are read in sorted order so a store is reproducible."""
    paths = sorted(p for p in glob.glob(input_pattern, recursive=True) if os.path.isfile(p))
    if not paths:
        raise MissingInputError(f"--input={input_pattern!r} matches no files; give a file, "
                                "a directory glob such as 'dir/**/*.txt', or .jsonl file(s)")
    for path in paths:
        if path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        yield json.loads(line)[text_key]
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise InputError(
                            f"{path}:{lineno}: expected a JSON object with a {text_key!r} string "
                            "(set --text_key to the field holding the text)"
                        ) from e
        else:
            with open(path, encoding="utf-8", errors="replace") as f:
                yield f.read()


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


def prepare(
    input_pattern: str,
    output: str,
    tokenizer: str = "byte",
    *,
    val_fraction: float = 0.01,
    text_key: str = "text",
    overwrite: bool = False,
) -> dict:
    """Tokenizes `input_pattern` into a token store at `output`; returns its metadata."""
    tok = load_tokenizer(tokenizer)
    dtype = token_store.token_dtype(tok.vocab_size)
    docs = []
    for text in iter_documents(input_pattern, text_key):
        if hasattr(tok, "encode_bytes"):
            ids = np.frombuffer(tok.encode_bytes(text), np.uint8).astype(dtype)
        else:
            ids = np.asarray(tok.encode(text), dtype)
        docs.append(ids)
    train, val = split_documents(docs, val_fraction)
    return token_store.write_store(
        output, {"train": train, "val": val}, tokenizer=tok.spec, vocab_size=tok.vocab_size,
        source=input_pattern, overwrite=overwrite,
    )


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
