"""On-disk token store: each split is a flat tensorstore (zarr3) array of token ids plus the
start offset of every document, described by `metadata.json`.

Layout::

    DIR/metadata.json        format, tokenizer, vocab_size, dtype, per-split counts
    DIR/<split>/tokens       zarr3 array [num_tokens] of uint8/uint16/uint32
    DIR/<split>/doc_starts   zarr3 array [num_docs] of int64, ascending, doc_starts[0] == 0

A store is written into a temporary sibling directory and renamed into place, so a reader never
sees a half-written store. A multi-host prepare writes one store per host, `DIR/part-i-of-n`;
`DIR` then reads as one store (the parts' splits concatenated in part order).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence

import numpy as np
import tensorstore as ts

from mla_moe import paths
from mla_moe.data.read_errors import DataReadError
from mla_moe.errors import ExistingOutputError, InputError, MissingInputError

FORMAT = "mla_moe.token_store"
VERSION = 1
SPLITS = ("train", "val")
# A split up to this size is read into memory when opened; a larger one is read on demand.
IN_MEMORY_BYTES = 1 << 30


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer dtype (uint8, uint16, uint32) that holds every token id."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dt).max + 1:
            return np.dtype(dt)
    raise ValueError(f"vocab_size={vocab_size} does not fit in uint32")


def _spec(path) -> dict:
    """The zarr3 array at `path` (local, or a gs:// URL: `paths.kvstore`)."""
    return {"driver": "zarr3", "kvstore": paths.kvstore(path)}


class StoreWriter:
    """Writes a token store in chunks: documents are appended per split and flushed every
    `chunk_tokens` tokens, so memory stays bounded whatever the corpus size; `commit` renames
    the temporary sibling directory into place (a crash leaves no store at `path`).

        with StoreWriter(path, tokenizer="byte", vocab_size=256) as w:
            w.add("train", docs)
            meta = w.commit()
    """

    TMP_INFIX = ".tmp-"

    def __init__(self, path: str, *, tokenizer: str, vocab_size: int, source: str = "",
                 overwrite: bool = False, chunk_tokens: int = 1 << 20, extra: dict | None = None):
        self.path = os.path.abspath(path)
        if os.path.exists(self.path) and not overwrite:
            raise ExistingOutputError(
                f"token store {self.path!r} already exists; choose another path or pass "
                "overwrite=True (--overwrite)")
        self.overwrite, self.chunk_tokens = overwrite, chunk_tokens
        self.vocab_size, self.dtype = int(vocab_size), token_dtype(vocab_size)
        self.meta = {
            "format": FORMAT, "version": VERSION, "tokenizer": tokenizer,
            "vocab_size": int(vocab_size), "dtype": self.dtype.name, "source": source,
            **(extra or {}), "splits": {},
        }
        parent = os.path.dirname(self.path)
        os.makedirs(parent, exist_ok=True)
        self.tmp = tempfile.mkdtemp(prefix=os.path.basename(self.path) + self.TMP_INFIX,
                                    dir=parent)
        self._arrays: dict[str, dict] = {}  # split -> {tokens, doc_starts} tensorstores
        self._pending: dict[str, list] = {}  # split -> [token pieces, start offsets, pending n]
        self._count: dict[str, list[int]] = {}  # split -> [num_tokens, num_docs] written+pending

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is not None or os.path.isdir(self.tmp):
            self.abort()

    def abort(self) -> None:
        """Removes the temporary directory (nothing is left at `path`)."""
        shutil.rmtree(self.tmp, ignore_errors=True)

    def add(self, split: str, docs: Iterable[np.ndarray]) -> None:
        """Appends documents (1-D integer arrays) to `split`; empty ones are dropped."""
        docs = [np.asarray(d) for d in docs]
        docs = [d for d in docs if d.size]
        if docs:
            self.add_flat(split, np.concatenate(docs),
                          np.fromiter((d.size for d in docs), np.int64, len(docs)))

    def add_flat(self, split: str, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Appends documents given as their concatenated tokens and their (positive) lengths."""
        pieces, starts, _ = self._pending.setdefault(split, [[], [], 0])
        count = self._count.setdefault(split, [0, 0])
        if tokens.size == 0:
            return
        if tokens.min() < 0 or tokens.max() >= self.vocab_size:
            raise InputError(f"split {split!r}: token ids outside [0, {self.vocab_size})")
        pieces.append(tokens.astype(self.dtype, copy=False))
        starts.append(count[0] + np.concatenate([[0], np.cumsum(lengths[:-1])]))
        count[0] += int(tokens.size)
        count[1] += int(lengths.size)
        self._pending[split][2] += int(tokens.size)
        if self._pending[split][2] >= self.chunk_tokens:
            self._flush(split)

    def num_docs(self, split: str) -> int:
        return self._count.get(split, [0, 0])[1]

    def _open(self, split: str) -> dict:
        if split not in self._arrays:
            self._arrays[split] = {
                name: ts.open(
                    _spec(os.path.join(self.tmp, split, name)), create=True, shape=[0],
                    dtype=ts.dtype(dt), chunk_layout=ts.ChunkLayout(chunk_shape=[chunk]),
                ).result()
                for name, dt, chunk in (
                    ("tokens", self.dtype.name, self.chunk_tokens),
                    ("doc_starts", "int64", max(1, self.chunk_tokens // 64)),
                )
            }
        return self._arrays[split]

    def _append(self, split: str, name: str, values: np.ndarray) -> None:
        arrays = self._open(split)
        n = arrays[name].shape[0]
        arrays[name] = arrays[name].resize(exclusive_max=[n + values.size],
                                           expand_only=True).result()
        arrays[name][n:n + values.size].write(values).result()

    def _flush(self, split: str) -> None:
        pieces, starts, pending = self._pending.get(split, [[], [], 0])
        if pending:
            self._append(split, "tokens", np.concatenate(pieces))
            self._append(split, "doc_starts", np.concatenate(starts).astype(np.int64))
        self._pending[split] = [[], [], 0]

    def _hold_out_last(self, val_fraction: float) -> None:
        """An empty validation split takes the last training document (or, for a corpus of one
        document, its tail) so that evaluation has data."""
        self._flush("train")
        arrays = self._open("train")
        n, docs = self._count["train"]
        starts = arrays["doc_starts"]
        if docs >= 2:
            cut = int(starts[docs - 1].read().result())
            keep_docs = docs - 1
        else:
            cut = max(1, int(n * (1 - val_fraction)))
            keep_docs = 1
            if cut >= n:
                raise InputError("--input is too small to hold out a validation split; give "
                                 "more text or a larger --val_fraction")
        tail = arrays["tokens"][cut:n].read().result()
        arrays["tokens"] = arrays["tokens"].resize(exclusive_max=[cut], shrink_only=True).result()
        arrays["doc_starts"] = starts.resize(exclusive_max=[keep_docs], shrink_only=True).result()
        self._count["train"] = [cut, keep_docs]
        self.add("val", [tail])

    def commit(self, splits: Sequence[str] = SPLITS, hold_out: float | None = None,
               allow_empty: Sequence[str] = ()) -> dict:
        """Writes metadata.json and renames the store into place; returns the metadata. With
        `hold_out` (a fraction), an empty "val" split is filled from "train" first. A split of
        `splits` with no tokens is an error unless named in `allow_empty`."""
        if hold_out is not None and self.num_docs("val") == 0 and self.num_docs("train"):
            self._hold_out_last(hold_out)
        for name in splits:
            self._flush(name)
            n, docs = self._count.get(name, [0, 0])
            if n == 0 and name not in allow_empty:
                raise InputError(f"split {name!r} has no tokens (empty or missing input?)")
            self._open(name)
            self.meta["splits"][name] = {"num_tokens": int(n), "num_docs": int(docs)}
        self._arrays.clear()
        with open(os.path.join(self.tmp, "metadata.json"), "w") as f:
            json.dump(self.meta, f, indent=2)
        if self.overwrite and os.path.exists(self.path):
            shutil.rmtree(self.path)
        os.rename(self.tmp, self.path)
        return self.meta


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
    splits = {name: list(docs) for name, docs in splits.items()}
    largest = max((sum(np.size(d) for d in docs) for docs in splits.values()), default=1)
    with StoreWriter(path, tokenizer=tokenizer, vocab_size=vocab_size, source=source,
                     overwrite=overwrite, chunk_tokens=max(1, min(chunk_tokens, largest))
                     ) as writer:
        for name, docs in splits.items():
            writer.add(name, docs)
        return writer.commit(tuple(splits))


PART = re.compile(r"part-(\d{5})-of-(\d{5})")


def part_name(index: int, count: int) -> str:
    """The directory of part `index` of `count` (one host's share of a multi-host prepare)."""
    return f"part-{index:05d}-of-{count:05d}"


def store_parts(path: str) -> list:
    """The stores that make up `path`: itself, or its complete `part-i-of-n` directories (all n
    of them, in order; a missing part is an error naming it)."""
    root = paths.resolve(path)
    if (root / "metadata.json").is_file() or not root.is_dir():
        return [root]
    found = {}
    for child in root.iterdir():
        m = PART.fullmatch(child.name)
        if m and (child / "metadata.json").is_file():
            found[int(m.group(1))] = (int(m.group(2)), child)
    if not found:
        return [root]
    counts = {n for n, _ in found.values()}
    if len(counts) > 1:
        raise InputError(f"data.path={path!r} mixes parts of {sorted(counts)} shards; "
                         "remove the parts of the older prepare")
    count = counts.pop()
    missing = [i for i in range(count) if i not in found]
    if missing:
        raise InputError(
            f"data.path={path!r} has {len(found)} of its {count} parts; missing "
            f"{', '.join(part_name(i, count) for i in missing[:5])} (still being written, or "
            "rerun launch.prepare_data with that --shard_index)")
    return [found[i][1] for i in range(count)]


def _read_one(path: str, meta_path) -> dict:
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


def read_metadata(path: str) -> dict:
    """The metadata.json of the token store at `path` (for a store of parts: the first part's,
    with the splits' counts summed and `parts` set); a missing store is a MissingInputError."""
    parts = store_parts(path)
    metas = [_read_one(path, p / "metadata.json") for p in parts]
    meta = dict(metas[0])
    if len(metas) > 1:
        for key in ("tokenizer", "vocab_size", "dtype"):
            if any(m[key] != meta[key] for m in metas):
                raise InputError(f"data.path={path!r}: its parts differ in {key}; prepare "
                                 "every part with the same --tokenizer")
        meta["parts"] = len(metas)
        meta["splits"] = {
            name: {k: sum(m["splits"].get(name, {}).get(k, 0) for m in metas)
                   for k in ("num_tokens", "num_docs")}
            for name in metas[0]["splits"]
        }
    return meta


class TokenSplit:
    """One split of a store (or of a store of parts, read as one): random access to token
    ranges and document boundaries.

    Token ids are read from tensorstore on demand unless the split is smaller than
    `in_memory_bytes` (default `IN_MEMORY_BYTES`), in which case it is loaded once (a window
    read then costs a slice). A read that fails (a chunk file truncated or damaged since the
    store was opened) raises a `DataReadError` naming the array and the token range.
    """

    def __init__(self, path: str, split: str, in_memory_bytes: int | None = None):
        if in_memory_bytes is None:
            in_memory_bytes = IN_MEMORY_BYTES
        self.path = path
        self.meta = read_metadata(path)
        if split not in self.meta["splits"]:
            raise InputError(f"data.path={path!r} has no {split!r} split; recreate it with "
                             "`python -m launch.prepare_data`")
        self.num_tokens = self.meta["splits"][split]["num_tokens"]
        if self.num_tokens == 0:
            raise InputError(f"data.path={path!r}: split {split!r} is empty")
        self.vocab_size = self.meta["vocab_size"]
        in_memory = self.num_tokens * np.dtype(self.meta["dtype"]).itemsize <= in_memory_bytes
        self._tokens, self._offsets, starts, self._arrays = [], [0], [], []
        for part in store_parts(path):
            n = _read_one(path, part / "metadata.json")["splits"].get(split, {}).get(
                "num_tokens", 0)
            if n == 0:
                continue
            tokens, doc_starts = (self._open(path, part / split / name, split)
                                  for name in ("tokens", "doc_starts"))
            self._tokens.append(tokens.read().result() if in_memory else tokens)
            self._arrays.append(str(part / split / "tokens"))
            starts.append(doc_starts.read().result().astype(np.int64) + self._offsets[-1])
            self._offsets.append(self._offsets[-1] + n)
        self.doc_starts = np.concatenate(starts)

    @staticmethod
    def _open(path: str, array_path, split: str):
        try:
            return ts.open(_spec(array_path), open=True).result()
        except ValueError as e:  # tensorstore: missing or unreadable array
            raise InputError(
                f"data.path={path!r}: cannot read split {split!r} "
                f"({str(e).splitlines()[0] if str(e) else e!r}); recreate the store with "
                "`python -m launch.prepare_data`") from None

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the split, as a numpy array (across parts if need be)."""
        out = []
        first = int(np.searchsorted(self._offsets, start, side="right")) - 1
        for i in range(max(first, 0), len(self._tokens)):
            lo, hi = self._offsets[i], self._offsets[i + 1]
            if lo >= stop:
                break
            piece = self._tokens[i][max(start, lo) - lo:min(stop, hi) - lo]
            if not isinstance(piece, np.ndarray):
                piece = self._read_piece(i, piece, max(start, lo) - lo, min(stop, hi) - lo)
            out.append(np.asarray(piece))
        return out[0] if len(out) == 1 else np.concatenate(out)

    def _read_piece(self, i: int, piece, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of part `i` (a tensorstore view), or a DataReadError naming
        the array and the range."""
        try:
            return piece.read().result()
        except ValueError as e:  # tensorstore: a chunk file truncated, damaged or unreadable
            raise DataReadError(
                f"data.path={self.path!r}: {self._arrays[i]}: tokens {start}-{stop - 1} are "
                f"unreadable ({_first_line(e)}); the store was damaged after it was written: "
                "recreate it with `python -m launch.prepare_data`", self._arrays[i], "token",
                start) from None

    def unigram_entropy(self, max_tokens: int = 1 << 24) -> float:
        """Entropy (nats) of the token distribution: the loss of the best position-blind model."""
        counts = np.bincount(
            self.read(0, min(self.num_tokens, max_tokens)).astype(np.int64),
            minlength=self.vocab_size,
        )
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
