"""Tokenizing a corpus into a token store at any size: streamed, parallel over files, committed
atomically, split into train/validation by a hash of each document.

    meta = prepare("web/*.parquet,code/*.jsonl.zst", "/data/mix", "tokenizer.json", workers=8)

Memory is bounded by the batch being encoded in each worker plus one store chunk: documents
flow through in batches of about `batch_bytes` of text (1 MB: a fast tokenizer's encodings of
a batch take about 30 times its text). With several workers, each encodes
whole files into spill files in the store's temporary directory and the main process appends
them to the store in file order, so the store is the same for any number of workers. A
document goes to validation when a hash of its text falls below `val_fraction` (stable across
runs, machines and worker counts); if none does, the last training document is held out.

`num_shards`/`shard_index` give host `shard_index` every `num_shards`-th file (of the sorted
list) and write `OUTPUT/part-<shard_index>-of-<num_shards>`; the complete set of parts reads as
one store.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import multiprocessing
import os
import queue as queue_lib
import shutil
import time
from collections.abc import Callable

import numpy as np

from mla_moe import paths
from mla_moe.data import readers, token_store
from mla_moe.data.tokenizer import check_fits, load_tokenizer
from mla_moe.errors import ConfigError, ExistingOutputError, InputError

SPLITS = token_store.SPLITS


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every worker needs to encode a file."""

    tokenizer: str
    text_key: str
    val_fraction: float
    utf8_errors: str
    batch_bytes: int


def is_validation(text: str, val_fraction: float) -> bool:
    """Whether a document is held out: the first 8 bytes of blake2b(text) as a fraction of
    2**64 fall below `val_fraction`."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < val_fraction * 2.0**64


def encode_file(path: str, tokenizer, s: Settings, sink: Callable, report: Callable) -> dict:
    """Reads, encodes and splits the documents of `path` in batches; `sink(split, tokens,
    lengths)` receives each batch's non-empty documents, `report(docs, tokens, text_bytes,
    fraction)` the progress. Returns the file's counts."""
    dtype = token_store.token_dtype(tokenizer.vocab_size)
    position = readers.Position()
    replaced_before = readers.REPLACED
    counts = {"docs": 0, "tokens": 0, "text_bytes": 0}
    batch, batch_bytes = [], 0

    def flush():
        docs = tokenizer.encode_documents(batch, dtype)
        held = [is_validation(t, s.val_fraction) for t in batch]
        tokens = 0
        for split, wanted in (("train", False), ("val", True)):
            chosen = [d for d, h in zip(docs, held) if h == wanted and d.size]
            if chosen:
                lengths = np.fromiter((d.size for d in chosen), np.int64, len(chosen))
                sink(split, np.concatenate(chosen), lengths)
                tokens += int(lengths.sum())
        counts["docs"] += len(batch)
        counts["tokens"] += tokens
        counts["text_bytes"] += batch_bytes
        report(len(batch), tokens, batch_bytes, position.fraction)

    for text in readers.read_documents(path, s.text_key, s.utf8_errors, position):
        if not text:
            continue
        batch.append(text)
        batch_bytes += len(text)
        if batch_bytes >= s.batch_bytes:
            flush()
            batch, batch_bytes = [], 0
    if batch:
        flush()
    counts["utf8_replaced"] = readers.REPLACED - replaced_before
    return counts


# ---- worker processes (spawned: the parent may hold threads that fork would copy) ----------
_WORKER: dict = {}


def _init_worker(settings: Settings, progress) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker; processes do the rest
    _WORKER.update(settings=settings, progress=progress,
                   tokenizer=load_tokenizer(settings.tokenizer))


def _spill_paths(spill_dir: str, index: int, split: str) -> tuple[str, str]:
    base = os.path.join(spill_dir, f"{index:08d}.{split}")
    return base + ".tokens", base + ".lengths"


def _encode_to_spill(task: tuple[int, str, str]) -> dict:
    index, path, spill_dir = task
    files = {}

    def sink(split, tokens, lengths):
        if split not in files:
            files[split] = [open(p, "wb") for p in _spill_paths(spill_dir, index, split)]
        files[split][0].write(tokens.tobytes())
        files[split][1].write(lengths.tobytes())

    def report(docs, tokens, text_bytes, fraction):
        _WORKER["progress"].put((index, docs, tokens, text_bytes, fraction))

    try:
        counts = encode_file(path, _WORKER["tokenizer"], _WORKER["settings"], sink, report)
    finally:
        for pair in files.values():
            for f in pair:
                f.close()
    return counts


def _append_spill(writer: token_store.StoreWriter, spill_dir: str, index: int,
                  chunk_tokens: int) -> None:
    """Appends file `index`'s spilled documents to the store, a chunk at a time."""
    for split in SPLITS:
        tokens_path, lengths_path = _spill_paths(spill_dir, index, split)
        if not os.path.exists(lengths_path):
            continue
        lengths = np.fromfile(lengths_path, np.int64)
        ends = np.cumsum(lengths)
        doc, start = 0, 0
        with open(tokens_path, "rb") as f:  # read, not mapped: resident memory stays one chunk
            while doc < lengths.size:
                last = max(doc + 1, int(np.searchsorted(ends, start + chunk_tokens, "right")))
                stop = int(ends[last - 1])
                tokens = np.fromfile(f, writer.dtype, count=stop - start)
                writer.add_flat(split, tokens, lengths[doc:last])
                doc, start = last, stop
        os.remove(tokens_path)
        os.remove(lengths_path)


class _Progress:
    """Totals over files and the one-line report, every `every_s` seconds."""

    def __init__(self, sizes: list[int], log: Callable | None, every_s: float):
        self.sizes, self.log, self.every_s = sizes, log, every_s
        self.total_bytes = max(1, sum(sizes))
        self.fraction = [0.0] * len(sizes)
        self.docs = self.tokens = self.text_bytes = 0
        self.start = self.last = time.monotonic()

    def update(self, index, docs, tokens, text_bytes, fraction) -> None:
        self.docs += docs
        self.tokens += tokens
        self.text_bytes += text_bytes
        self.fraction[index] = fraction
        now = time.monotonic()
        if self.log and now - self.last >= self.every_s:
            self.last = now
            self.log(self.line(now))

    def line(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        done = sum(f * s for f, s in zip(self.fraction, self.sizes)) / self.total_bytes
        eta = elapsed * (1 - done) / done if done > 0 else float("nan")
        return (f"prepare: {self.docs:,} documents, {self.tokens:,} tokens, "
                f"{self.text_bytes / elapsed / 1e6:.1f} MB/s of text, {100 * done:.0f}% of the "
                f"input, ETA {_duration(eta)}")


def _duration(seconds: float) -> str:
    if seconds != seconds:  # NaN: nothing done yet
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def remove_stale(output: str) -> int:
    """Removes temporary directories that an interrupted prepare of `output` left; returns
    how many."""
    stale = glob.glob(glob.escape(os.path.abspath(output)) + token_store.StoreWriter.TMP_INFIX
                      + "*")
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return len(stale)


def output_path(output: str, num_shards: int, shard_index: int) -> str:
    """Where this host's store goes: `output`, or its part directory with several shards."""
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ConfigError(f"--shard_index={shard_index} must be in [0, --num_shards="
                          f"{num_shards})")
    if num_shards == 1:
        return output
    return os.path.join(output, token_store.part_name(shard_index, num_shards))


def prepare(
    input_pattern: str,
    output: str,
    tokenizer: str = "byte",
    *,
    val_fraction: float = 0.01,
    text_key: str = "text",
    overwrite: bool = False,
    workers: int = 1,
    num_shards: int = 1,
    shard_index: int = 0,
    utf8_errors: str = "strict",
    vocab_size: int = 0,
    batch_bytes: int = 1 << 20,
    chunk_tokens: int = 1 << 22,
    log: Callable[[str], None] | None = None,
    log_every_s: float = 10.0,
) -> dict:
    """Tokenizes the files of `input_pattern` (comma-separated globs) into a token store at
    `output` (or its part `shard_index` of `num_shards`); returns the store's metadata. With
    `vocab_size`, a tokenizer with more ids is refused before anything is read."""
    if not 0 < val_fraction < 1:
        raise InputError(f"--val_fraction must be in (0, 1), got {val_fraction}")
    if workers < 1:
        raise InputError(f"--workers must be >= 1, got {workers}")
    out = output_path(output, num_shards, shard_index)
    if os.path.exists(out) and not overwrite:
        raise ExistingOutputError(f"--output={out!r} already exists; choose another path or "
                                  "pass --overwrite")
    tok = load_tokenizer(tokenizer)
    if vocab_size:
        check_fits(tok, vocab_size, "--vocab_size")
    files = readers.expand_inputs(input_pattern)
    if num_shards > len(files):
        raise InputError(f"--num_shards={num_shards} is more than the {len(files)} input files; "
                         "each shard needs at least one file")
    files = files[shard_index::num_shards]
    for path in files:  # a bad or unsupported file fails here, before any tokenizing
        readers.detect_format(path)
    sizes = [1 if paths.is_url(p) else os.path.getsize(p) for p in files]
    settings = Settings(tok.spec, text_key, val_fraction, utf8_errors, batch_bytes)
    workers = min(workers, len(files))
    stale = remove_stale(out)
    if log:
        log(f"prepare: {len(files)} files ({sum(sizes) / 1e6:,.1f} MB) -> {out} with "
            f"{workers} worker{'s' * (workers > 1)}, tokenizer {tok.spec} (vocab "
            f"{tok.vocab_size})" + (f"; removed {stale} unfinished temporary store(s)"
                                    if stale else ""))
    progress = _Progress(sizes, log, log_every_s)
    extra = {"files": len(files)}
    if num_shards > 1:
        extra["shard"] = {"index": shard_index, "count": num_shards}
    totals = {"utf8_replaced": 0}
    with token_store.StoreWriter(out, tokenizer=tok.spec, vocab_size=tok.vocab_size,
                                 source=input_pattern, overwrite=overwrite,
                                 chunk_tokens=chunk_tokens, extra=extra) as writer:
        if workers == 1:
            for i, path in enumerate(files):
                counts = encode_file(path, tok, settings, writer.add_flat,
                                     lambda *a, i=i: progress.update(i, *a))
                totals["utf8_replaced"] += counts["utf8_replaced"]
        else:
            _run_pool(files, settings, workers, writer, progress, totals, chunk_tokens)
        if not writer.num_docs("train") + writer.num_docs("val"):
            raise InputError(f"--input={input_pattern!r} has no text (every document is empty)")
        writer.meta["utf8_replaced"] = totals["utf8_replaced"]
        allow = ("val",) if num_shards > 1 else ()  # one part may hold no validation document
        meta = writer.commit(SPLITS, hold_out=None if num_shards > 1 else val_fraction,
                             allow_empty=allow)
    meta["seconds"] = time.monotonic() - progress.start
    meta["path"] = writer.path
    return meta


def _run_pool(files, settings, workers, writer, progress, totals, chunk_tokens) -> None:
    spill_dir = os.path.join(writer.tmp, "spill")
    os.makedirs(spill_dir)
    ctx = multiprocessing.get_context("spawn")
    updates = ctx.Queue()
    pool = ctx.Pool(workers, _init_worker, (settings, updates))
    try:
        results = pool.imap(_encode_to_spill, [(i, p, spill_dir) for i, p in enumerate(files)])
        for i in range(len(files)):
            while True:
                _drain(updates, progress)
                try:
                    counts = results.next(timeout=0.5)
                    break
                except multiprocessing.TimeoutError:
                    continue
            _drain(updates, progress)
            totals["utf8_replaced"] += counts["utf8_replaced"]
            _append_spill(writer, spill_dir, i, chunk_tokens)
        pool.close()
    finally:
        pool.terminate()
        pool.join()
    shutil.rmtree(spill_dir)


def _drain(updates, progress: _Progress) -> None:
    while True:
        try:
            progress.update(*updates.get_nowait())
        except queue_lib.Empty:
            return
