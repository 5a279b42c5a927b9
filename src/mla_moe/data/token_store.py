"""On-disk token store: each split is a flat tensorstore (zarr3) array of token ids plus the
start offset of every document, described by `metadata.json`.

Layout::

    DIR/metadata.json        format, tokenizer, vocab_size, dtype, per-split counts
    DIR/<split>/tokens       zarr3 array [num_tokens] of uint8/uint16/uint32
    DIR/<split>/doc_starts   zarr3 array [num_docs] of int64, ascending, doc_starts[0] == 0

A store is written into a temporary sibling directory and renamed into place, so a reader never
sees a half-written store.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable

import numpy as np
import tensorstore as ts

from mla_moe import paths
from mla_moe.errors import ExistingOutputError, InputError, MissingInputError

FORMAT = "mla_moe.token_store"
VERSION = 1
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer dtype (uint8, uint16, uint32) that holds every token id."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dt).max + 1:
            return np.dtype(dt)
    raise ValueError(f"vocab_size={vocab_size} does not fit in uint32")


def _spec(path) -> dict:
    """The zarr3 array at `path` (local, or a gs:// URL: `paths.kvstore`)."""
    return {"driver": "zarr3", "kvstore": paths.kvstore(path)}


def _write_array(path: str, array: np.ndarray, chunk: int) -> None:
    chunk = max(1, min(chunk, array.shape[0]))
    arr = ts.open(
        _spec(path), create=True, dtype=ts.dtype(array.dtype.name), shape=array.shape,
        chunk_layout=ts.ChunkLayout(chunk_shape=[chunk]),
    ).result()
    arr.write(array).result()


def write_store(
    path: str,
    splits: dict[str, Iterable[np.ndarray]],
    *,
    tokenizer: str,
    vocab_size: int,
    source: str = "",
    overwrite: bool = False,
    chunk_tokens: int = 1 << 20,
) -> dict:
    """Writes documents (1-D integer arrays) per split; returns the metadata dict.

    Empty documents are dropped; a split with no tokens is an error (training on it would fail
    later with a less helpful message).
    """
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        raise ExistingOutputError(
            f"token store {path!r} already exists; choose another path or pass overwrite=True "
            "(--overwrite)")
    dtype = token_dtype(vocab_size)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=parent)
    try:
        meta = {
            "format": FORMAT, "version": VERSION, "tokenizer": tokenizer,
            "vocab_size": int(vocab_size), "dtype": dtype.name, "source": source, "splits": {},
        }
        for name, docs in splits.items():
            pieces, starts, n = [], [], 0
            for doc in docs:
                doc = np.asarray(doc)
                if doc.size == 0:
                    continue
                if doc.min() < 0 or doc.max() >= vocab_size:
                    raise InputError(f"split {name!r}: token ids outside [0, {vocab_size})")
                pieces.append(doc.astype(dtype))
                starts.append(n)
                n += doc.size
            if n == 0:
                raise InputError(f"split {name!r} has no tokens (empty or missing input?)")
            _write_array(os.path.join(tmp, name, "tokens"), np.concatenate(pieces), chunk_tokens)
            _write_array(
                os.path.join(tmp, name, "doc_starts"), np.asarray(starts, np.int64), chunk_tokens
            )
            meta["splits"][name] = {"num_tokens": int(n), "num_docs": len(starts)}
        with open(os.path.join(tmp, "metadata.json"), "w") as f:
            json.dump(meta, f, indent=2)
        if overwrite and os.path.exists(path):
            shutil.rmtree(path)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def read_metadata(path: str) -> dict:
    """The metadata.json of the token store at `path`; a missing store is a MissingInputError."""
    meta_path = paths.resolve(path) / "metadata.json"
    if not meta_path.is_file():
        raise MissingInputError(
            f"data.path={path!r} is not a token store (no metadata.json); "
            "create one with `python -m launch.prepare_data`"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"data.path={path!r}: {meta_path} is not valid JSON ({e}); recreate "
                         "the store with `python -m launch.prepare_data`") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise InputError(f"data.path={path!r}: unknown format {got!r} in {meta_path}; create "
                         "a token store with `python -m launch.prepare_data`")
    return meta


class TokenSplit:
    """One split of a store: random access to token ranges and document boundaries.

    Token ids are read from tensorstore on demand unless the split is smaller than
    `in_memory_bytes`, in which case it is loaded once (a window read then costs a slice).
    """

    def __init__(self, path: str, split: str, in_memory_bytes: int = 1 << 30):
        self.meta = read_metadata(path)
        if split not in self.meta["splits"]:
            raise InputError(f"data.path={path!r} has no {split!r} split; recreate it with "
                             "`python -m launch.prepare_data`")
        info = self.meta["splits"][split]
        self.num_tokens = info["num_tokens"]
        if self.num_tokens == 0:
            raise InputError(f"data.path={path!r}: split {split!r} is empty")
        self.vocab_size = self.meta["vocab_size"]
        try:
            tokens = ts.open(_spec(paths.resolve(path) / split / "tokens"), open=True).result()
        except ValueError as e:  # tensorstore: missing or unreadable array
            raise InputError(
                f"data.path={path!r}: cannot read split {split!r} "
                f"({str(e).splitlines()[0] if str(e) else e!r}); recreate the store with "
                "`python -m launch.prepare_data`") from None
        if self.num_tokens * tokens.dtype.numpy_dtype.itemsize <= in_memory_bytes:
            tokens = tokens.read().result()
        self._tokens = tokens
        self.doc_starts = (
            ts.open(_spec(paths.resolve(path) / split / "doc_starts"), open=True)
            .result().read().result()
        )

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the split, as a numpy array."""
        out = self._tokens[start:stop]
        if not isinstance(out, np.ndarray):
            out = out.read().result()
        return np.asarray(out)

    def unigram_entropy(self, max_tokens: int = 1 << 24) -> float:
        """Entropy (nats) of the token distribution: the loss of the best position-blind model."""
        counts = np.bincount(
            self.read(0, min(self.num_tokens, max_tokens)).astype(np.int64),
            minlength=self.vocab_size,
        )
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())
