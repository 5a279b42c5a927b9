"""Raw files as a training source, tokenized on the fly (in Grain worker processes).

    data.path = "raw:web/*.jsonl.zst"     # `raw:` + a glob: a raw source (else a token store)
    data.tokenizer = "/models/DeepSeek-V3"
    data.workers = 4                      # processes tokenizing, per raw source and host

The files the glob matches (sorted; `**` recurses; any format `readers.py` reads, text under
`data.text_key`) are read as an endless sequence of *file visits*: visit k reads file
`order_e[k % n]` of epoch e = k // n, order_e = default_rng([seed, e]).permutation(n), whole,
its documents in file order, each tokenized as `launch.prepare_data` would (empty ones
dropped). Process p of P reads visits p, p + P, p + 2P, ...; with W = data.workers > 1, worker
w of it reads every W-th of those (w, w + W, ...). Each reader (a worker, or the process itself
when W <= 1) concatenates its documents and cuts windows of seq_len + 1 tokens at stride
seq_len, packed exactly as a store's windows are (`pipeline.pack_window`): a segment id per
document, positions from 0 in each, weight 0 on the target that crosses a boundary. The process
takes its readers' windows in turn (worker 0, 1, ..., W-1, 0, ...).

The stream is thus a pure function of the seed, the files, P and max(W, 1). Unlike a store's,
it changes with the process count and with `data.workers` (a resume refuses a changed
data.workers). Every file is read by exactly one process per epoch.

Resume: a reader's state is (visit, documents of it consumed) for the document holding the
next window's first token, plus that token's offset in it; a restore re-reads that file up to
the document (without tokenizing) and continues with bitwise the same windows.
"""

from __future__ import annotations

import collections
import itertools
import os
from collections.abc import Iterator

import grain
import numpy as np

from mla_moe import paths
from mla_moe.data import readers, worker_exit
from mla_moe.data.read_errors import DataReadError
from mla_moe.data.tokenizer import load_tokenizer
from mla_moe.errors import ConfigError, InputError

PREFIX = "raw:"
# Documents tokenized per call (a batched call is several times faster with `tokenizers`).
ENCODE_DOCS, ENCODE_CHARS = 256, 1 << 20


def is_raw(entry: str) -> bool:
    """Whether an entry of `data.path` names raw files (`raw:GLOB`) rather than a store."""
    return entry.startswith(PREFIX)


def pattern_of(entry: str) -> str:
    """The glob of a `raw:GLOB` entry; a ConfigError if it is empty."""
    pattern = entry[len(PREFIX):].strip()
    if not pattern:
        raise ConfigError(f"data.path entry {entry!r} names no files; write raw:GLOB, e.g. "
                          "raw:web/*.jsonl.zst")
    return pattern


def file_of_visit(num_files: int, seed: int, k: int) -> int:
    """Index (into the sorted files) of the file that visit `k` reads."""
    epoch, i = divmod(int(k), num_files)
    return int(np.random.default_rng([seed, epoch]).permutation(num_files)[i])


class RawSource:
    """One raw source: its files, tokenizer and text key, and what the run's summary reads of
    a source (`num_tokens` estimated from a sample, `vocab_size`, `read` of the sample)."""

    def __init__(self, entry: str, tokenizer: str, text_key: str = "text",
                 sample_chars: int = 1 << 20):
        self.path, self.pattern = entry, pattern_of(entry)
        try:
            self.files = tuple(readers.expand_inputs(self.pattern))
        except InputError as e:
            raise type(e)(f"data.path entry {entry!r}: {e}") from None
        self.tokenizer, self.text_key = tokenizer, text_key
        loaded = load_tokenizer(tokenizer)
        self.vocab_size = loaded.vocab_size
        self._sample, self.num_tokens = self._estimate(loaded, sample_chars)

    def _estimate(self, tokenizer, sample_chars: int) -> tuple[np.ndarray, int]:
        """Tokens of the first documents (up to `sample_chars` characters), and the corpus's
        token count: exact when that was all of it, else extrapolated by bytes on disk (for
        the run's summary line)."""
        texts, chars, read_bytes = [], 0, 0.0
        for path in self.files:
            position = readers.Position()
            for text in readers.read_documents(path, self.text_key, position=position):
                texts.append(text)
                chars += len(text)
                if chars >= sample_chars:
                    break
            read_bytes += position.fraction * _file_size(path)
            if chars >= sample_chars:
                break
        docs = [d for d in tokenizer.encode_documents(texts, np.int32) if d.size]
        sample = np.concatenate(docs) if docs else np.zeros(0, np.int32)
        if chars < sample_chars:  # every document was read
            if not sample.size:
                raise InputError(f"data.path entry {self.path!r}: no text in its "
                                 f"{len(self.files)} file(s) (every document is empty)")
            return sample, int(sample.size)
        total = sum(_file_size(p) for p in self.files)
        return sample, EstimatedCount(sample.size * total / max(read_bytes, 1.0))

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the sample (the first documents of the sorted files)."""
        return self._sample[start:stop]

    def unigram_entropy(self, max_tokens: int = 1 << 24) -> float:
        """Entropy (nats) of the sample's token distribution."""
        counts = np.bincount(self._sample[:max_tokens].astype(np.int64),
                             minlength=self.vocab_size)
        p = counts[counts > 0] / max(counts.sum(), 1)
        return float(-(p * np.log(p)).sum())


class EstimatedCount(int):
    """A count known only approximately: formats with a leading '~'."""

    def __new__(cls, value: float):
        return super().__new__(cls, round(value))

    def __format__(self, spec: str) -> str:
        return "~" + format(int(self), spec)


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path) if not paths.is_url(path) else paths.resolve(path).stat(
        ).length
    except (OSError, AttributeError):
        return 1


class DocumentTokens(grain.IterDataset):
    """The token ids (int32) of the non-empty documents of file visits start, start + step,
    start + 2 step, ... of `source` (endless). Grain's worker slicing (`set_slice`) narrows the
    visits further, so each worker reads its own files. Holds only what a worker process needs
    (file names, tokenizer spec, text key): Grain pickles it to each."""

    def __init__(self, source: RawSource, seed: int, start: int = 0, step: int = 1):
        super().__init__()
        self.files, self.tokenizer = source.files, source.tokenizer
        self.text_key = source.text_key
        self.seed, self.start, self.step = seed, start, step
        self._unsliced = (start, step)

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        """Keeps every `sl.step`-th visit from the `sl.start`-th (of the visits given at
        construction: setting a slice twice does not narrow twice)."""
        del sequential_slice  # visits are interleaved whatever is asked: files are the unit
        start, step = self._unsliced
        self.start, self.step = start + (sl.start or 0) * step, step * (sl.step or 1)

    def __iter__(self) -> DocumentTokensIterator:
        return DocumentTokensIterator(self)

    def __str__(self) -> str:
        return f"DocumentTokens({len(self.files)} files, visits {self.start}::{self.step})"


class DocumentTokensIterator(grain.DatasetIterator):
    """State: {"visit": the current visit's local index, "docs": its documents consumed}."""

    def __init__(self, ds: DocumentTokens):
        super().__init__()
        self._ds, self._visit, self._docs = ds, 0, 0
        self._tokenizer = None
        self._reader: Iterator[tuple[int, str]] | None = None
        self._pending: collections.deque = collections.deque()
        self._path = ""

    def __next__(self) -> np.ndarray:
        while True:
            if self._pending:
                index, tokens = self._pending.popleft()
                self._docs = index + 1
                return tokens
            if self._reader is None:
                self._open()
            texts = []
            chars = 0
            for index, text in self._reader:
                texts.append((index, text))
                chars += len(text)
                if len(texts) == ENCODE_DOCS or chars >= ENCODE_CHARS:
                    break
            if not texts:
                self._reader, self._visit, self._docs = None, self._visit + 1, 0
                continue
            for (index, _), tokens in zip(texts, self._encode(texts)):
                if tokens.size:
                    self._pending.append((index, tokens))

    def _open(self) -> None:
        ds = self._ds
        k = ds.start + ds.step * self._visit
        self._path = ds.files[file_of_visit(len(ds.files), ds.seed, k)]
        self._reader = enumerate(_documents(self._path, ds.text_key))
        for _ in itertools.islice(self._reader, self._docs):  # a resume: skip, no tokenizing
            pass

    def _encode(self, texts: list[tuple[int, str]]) -> list[np.ndarray]:
        """Token ids of (document index, text) pairs of the current file, in one call."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self._ds.tokenizer)
        try:
            return self._tokenizer.encode_documents([t for _, t in texts], np.int32)
        except Exception as e:  # the tokenizer libraries raise their own types
            raise DataReadError(f"{self._path}: documents {texts[0][0]}-{texts[-1][0]} "
                                f"(0-based) could not be tokenized ({type(e).__name__}: {e})",
                                self._path, "document", texts[0][0]) from None

    def get_state(self) -> dict:
        return {"visit": self._visit, "docs": self._docs}

    def set_state(self, state: dict) -> None:
        self._visit, self._docs = int(state["visit"]), int(state["docs"])
        self._reader = None
        self._pending.clear()


def _documents(path: str, text_key: str) -> Iterator[str]:
    """`readers.read_documents`, with any error turned into a DataReadError naming the file
    (and carrying the line, row or record where the reader knows it)."""
    try:
        yield from readers.read_documents(path, text_key)
    except InputError as e:  # its advice names prepare_data's flags: name the config's
        message = str(e).replace("--text_key", "data.text_key").replace(
            " or pass --utf8_errors=replace", "")
        if isinstance(e, DataReadError):
            raise e.reworded(message) from None
        raise DataReadError(message, path) from None
    except (OSError, ValueError, EOFError) as e:
        raise DataReadError(f"{path}: unreadable ({type(e).__name__}: {e})", path) from None


class PackedWindows(grain.IterDataset):
    """Windows of seq_len + 1 tokens at stride seq_len over the concatenated documents of its
    parent (a `DocumentTokens`), packed as `pipeline.pack_window` packs a store's."""

    def __init__(self, parent: DocumentTokens, seq_len: int):
        super().__init__(parent)
        self.seq_len = seq_len

    def __iter__(self) -> PackedWindowsIterator:
        return PackedWindowsIterator(self._parent.__iter__(), self.seq_len)

    def __str__(self) -> str:
        return f"PackedWindows(seq_len={self.seq_len})"


class PackedWindowsIterator(grain.DatasetIterator):
    """State: {"docs": the documents iterator's state before the document holding the next
    window's first token, "offset": that token's index in the document}."""

    def __init__(self, parent: grain.DatasetIterator, seq_len: int):
        super().__init__(parent)
        self.seq_len = seq_len
        self._docs: collections.deque = collections.deque()  # (state before it, tokens)
        self._offset, self._available = 0, 0

    def __next__(self) -> dict[str, np.ndarray]:
        T = self.seq_len
        while self._available < T + 1:
            state = self._parent.get_state()
            tokens = next(self._parent)
            self._docs.append((state, tokens))
            self._available += tokens.size
        pieces, need, offset = [], T + 1, self._offset
        for _, tokens in self._docs:
            piece = tokens[offset:offset + need]
            pieces.append(piece)
            need, offset = need - piece.size, 0
            if not need:
                break
        lengths = np.array([p.size for p in pieces])
        starts = np.cumsum(lengths) - lengths
        segment_T1 = np.repeat(np.arange(1, len(pieces) + 1, dtype=np.int32), lengths)
        positions_T1 = (np.arange(T + 1) - np.repeat(starts, lengths)).astype(np.int32)
        tokens_T1 = np.concatenate(pieces).astype(np.int32, copy=False)
        self._offset += T
        self._available -= T
        while self._offset >= self._docs[0][1].size:
            self._offset -= self._docs.popleft()[1].size
        return {
            "inputs": tokens_T1[:-1],
            "targets": tokens_T1[1:],
            "positions": positions_T1[:-1],
            "segment_ids": segment_T1[:-1],
            "weights": (segment_T1[1:] == segment_T1[:-1]).astype(np.float32),
        }

    def get_state(self) -> dict:
        docs = self._docs[0][0] if self._docs else self._parent.get_state()
        return {"docs": docs, "offset": self._offset}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["docs"])
        self._docs.clear()
        self._offset = int(state["offset"])
        self._available = -self._offset


def raw_windows(source: RawSource, seq_len: int, seed: int, process_index: int,
                process_count: int, workers: int, buffer: int = 16) -> grain.IterDataset:
    """This process's windows of `source` (endless), tokenized in `workers` processes (none
    for 0: in this process), each holding up to `buffer` windows ahead (a tokenizer batch
    makes windows in bursts). Each worker ends when this process does, even by SIGKILL
    (`worker_exit`)."""
    ds = PackedWindows(DocumentTokens(source, seed, process_index, process_count), seq_len)
    if workers <= 0:
        return ds
    from absl import flags

    if not flags.FLAGS.is_parsed():  # Grain's worker processes read its absl flags
        flags.FLAGS.mark_as_parsed()
    return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                      per_worker_buffer_size=buffer),
                          worker_init_fn=worker_exit.worker_init_fn())
