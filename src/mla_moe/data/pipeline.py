"""Grain input pipeline: shuffled windows of `seq_len + 1` tokens, packed with segment ids.

Windows tile a split's token stream with stride `seq_len` (consecutive windows share one
token, so every token is a target once per epoch). A window that crosses document boundaries
is packed: each document in it gets its own segment id (1, 2, ...), positions restart at 0 in
each segment, and the target that would cross a boundary gets weight 0.

Several stores (`mixture.TokenMixture`) are mixed per global example by `mixture.Schedule`;
one store reads exactly as before mixtures existed.

Per-process sharding keeps the global batch independent of the process count: global batch k
holds shuffled windows [k*G, (k+1)*G), and process p reads its contiguous slice
[k*G + p*L, k*G + (p+1)*L) with L = G / process_count, which is exactly the slice of the batch
its devices hold when the batch is sharded over the leading mesh axes.

A raw source (`raw_source.RawSource`, tokenized on the fly) is a stream rather than an array of
windows: a run with one takes each raw example from that source's process-local stream
(`raw_source.py`) and every store example as above, in an iterator whose checkpoint holds the
example count and each raw stream's position.

Every train iterator's state also names the stream it is a position in (sources, weights,
seed, batch, process count: `stream_state`), so that a resume refuses a position of another.

Batch arrays (all [L, T]): `inputs`, `targets`, `positions`, `segment_ids` int32 and `weights`
float32.
"""

from __future__ import annotations

import dataclasses
import sys

import grain
import jax
import numpy as np

from mla_moe.data.mixture import Schedule, TokenMixture
from mla_moe.data.raw_source import RawSource, raw_windows
from mla_moe.data.stream_state import StreamIterator, describe
from mla_moe.data.token_store import TokenSplit
from mla_moe.errors import ConfigError, InputError


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """The pipeline's settings: window length, global batch, shuffle seed, this process's
    place among `process_count`, and Grain's read threads and prefetch."""

    seq_len: int
    global_batch: int
    seed: int = 0
    process_index: int = 0
    process_count: int = 1
    num_threads: int = 2
    prefetch: int = 4
    workers: int = 0  # processes tokenizing each raw source (0: this process)

    def __post_init__(self):
        if self.seq_len <= 0:
            raise ConfigError(f"train.seq_len must be positive, got {self.seq_len}")
        if self.global_batch <= 0:
            raise ConfigError(f"train.batch_size must be positive, got {self.global_batch}")
        if self.global_batch % self.process_count:
            raise ConfigError(
                f"train.batch_size={self.global_batch} is not divisible by the "
                f"{self.process_count} processes"
            )

    @property
    def local_batch(self) -> int:
        """L: sequences this process reads per global batch."""
        return self.global_batch // self.process_count


def pack_window(split: TokenSplit, start: int, seq_len: int) -> dict[str, np.ndarray]:
    """The packed example for tokens [start, start + seq_len + 1)."""
    tokens = split.read(start, start + seq_len + 1).astype(np.int32)
    pos = np.arange(start, start + seq_len + 1)
    doc = np.searchsorted(split.doc_starts, pos, side="right") - 1
    segment = (doc - doc[0] + 1).astype(np.int32)
    seg_start = np.maximum(split.doc_starts[doc], start)
    positions = (pos - seg_start).astype(np.int32)
    return {
        "inputs": tokens[:-1],
        "targets": tokens[1:],
        "positions": positions[:-1],
        "segment_ids": segment[:-1],
        "weights": (segment[1:] == segment[:-1]).astype(np.float32),
    }


def num_windows(split: TokenSplit, seq_len: int) -> int:
    """Windows of `seq_len + 1` tokens (stride `seq_len`) in the split."""
    return (split.num_tokens - 1) // seq_len


def source_seed(seed: int, s: int) -> int:
    """The window-shuffle seed of source `s` (source 0 shuffles as a single store does)."""
    return seed + 1_000_003 * s


def _global_index(i: int, cfg: PipelineConfig) -> int:
    """The global example index of this process's i-th example."""
    G, L = cfg.global_batch, cfg.local_batch
    return (i // L) * G + cfg.process_index * L + i % L


def _window_orders(splits: list, cfg: PipelineConfig) -> list:
    """Each store's endless shuffled window order (None for a raw source)."""
    orders = []
    for s, split in enumerate(splits):
        if isinstance(split, RawSource):
            orders.append(None)
            continue
        n = num_windows(split, cfg.seq_len)
        if n < (cfg.global_batch if len(splits) == 1 else 1):
            where = "" if len(splits) == 1 else f" (data.path source {s}: {split.path})"
            raise InputError(
                f"the training data{where} has {split.num_tokens} tokens, {n} windows of "
                f"train.seq_len={cfg.seq_len}: fewer than "
                + (f"train.batch_size={cfg.global_batch}" if len(splits) == 1 else "one"))
        orders.append(grain.MapDataset.range(n).shuffle(seed=source_seed(cfg.seed, s))
                      .repeat(None))
    return orders


def train_dataset(source: TokenSplit | TokenMixture, cfg: PipelineConfig) -> grain.MapDataset:
    """An endless MapDataset of this process's local batches (reshuffled every epoch); a
    mixture picks each global example's source by `mixture.Schedule`."""
    splits = source.splits if isinstance(source, TokenMixture) else [source]
    G, L, T = cfg.global_batch, cfg.local_batch, cfg.seq_len
    orders = _window_orders(splits, cfg)
    schedule = Schedule(source.weights, cfg.seed) if len(splits) > 1 else None

    def example(i: int) -> dict[str, np.ndarray]:
        g = _global_index(i, cfg)
        s, j = schedule.slot(g) if schedule else (0, g)
        return pack_window(splits[s], orders[s][j] * T, T)

    steps = sys.maxsize // (2 * G)
    return grain.MapDataset.range(steps * L).map(example).batch(L, drop_remainder=True)


class StreamedExamples(grain.IterDataset):
    """This process's examples when a source is raw: the schedule (or the only source) picks
    each example's source; a store's example is its window as in `train_dataset`, a raw
    source's is the next window of its stream (`raw_source.raw_windows`, its parent here)."""

    def __init__(self, splits: list, weights: list[float], cfg: PipelineConfig):
        self.raw = [s for s, split in enumerate(splits) if isinstance(split, RawSource)]
        super().__init__([raw_windows(splits[s], cfg.seq_len, source_seed(cfg.seed, s),
                                      cfg.process_index, cfg.process_count, cfg.workers)
                          for s in self.raw])
        self.splits, self.cfg = splits, cfg
        self.orders = _window_orders(splits, cfg)
        self.schedule = Schedule(weights, cfg.seed) if len(splits) > 1 else None

    def __iter__(self) -> StreamedExamplesIterator:
        return StreamedExamplesIterator(self, [p.__iter__() for p in self.parents])


class StreamedExamplesIterator(grain.DatasetIterator):
    """State: {"example": examples read, "raw": each raw stream's state}."""

    def __init__(self, ds: StreamedExamples, raw_iterators: list):
        super().__init__(raw_iterators)
        self._ds, self._example = ds, 0
        self._raw = dict(zip(ds.raw, raw_iterators))

    def __next__(self) -> dict[str, np.ndarray]:
        ds = self._ds
        g = _global_index(self._example, ds.cfg)
        s, j = ds.schedule.slot(g) if ds.schedule else (0, g)
        if s in self._raw:
            out = next(self._raw[s])
        else:
            out = pack_window(ds.splits[s], ds.orders[s][j] * ds.cfg.seq_len, ds.cfg.seq_len)
        self._example += 1
        return out

    def get_state(self) -> dict:
        return {"example": self._example, "raw": [self._raw[s].get_state() for s in self._ds.raw]}

    def set_state(self, state: dict) -> None:
        self._example = int(state["example"])
        for s, raw_state in zip(self._ds.raw, state["raw"]):
            self._raw[s].set_state(raw_state)


def train_iterator(source: TokenSplit | TokenMixture | RawSource,
                   cfg: PipelineConfig) -> StreamIterator:
    """Prefetching, checkpointable iterator (`get_state`/`set_state`) over local batches; its
    state names the stream it is a position in (`stream_state`), and a state of another
    stream is refused."""
    splits = source.splits if isinstance(source, TokenMixture) else [source]
    if any(isinstance(split, RawSource) for split in splits):
        weights = source.weights if isinstance(source, TokenMixture) else [1.0]
        ds = StreamedExamples(splits, weights, cfg).batch(cfg.local_batch, drop_remainder=True)
        if cfg.prefetch:
            ds = grain.experimental.ThreadPrefetchIterDataset(
                ds, prefetch_buffer_size=cfg.prefetch)
    else:
        ds = train_dataset(source, cfg).to_iter_dataset(
            grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=cfg.prefetch))
    return StreamIterator(iter(ds), describe(source, cfg), cfg.process_index)


def eval_batches(source: TokenSplit | TokenMixture, cfg: PipelineConfig,
                 num_batches: int) -> list[dict]:
    """A fixed list of local validation batches: each source's first windows, in order
    (wrapping around a small split), so every evaluation scores the same tokens; a mixture
    takes its sources' windows by the same schedule as training."""
    splits = source.splits if isinstance(source, TokenMixture) else [source]
    counts = []
    for split in splits:
        counts.append(num_windows(split, cfg.seq_len))
        if counts[-1] == 0:
            raise InputError(
                f"the validation split{'' if len(splits) == 1 else ' of ' + split.path} has "
                f"{split.num_tokens} tokens: fewer than train.seq_len + 1 = {cfg.seq_len + 1}"
            )
    schedule = Schedule(source.weights, cfg.seed) if len(splits) > 1 else None
    G, L, p, T = cfg.global_batch, cfg.local_batch, cfg.process_index, cfg.seq_len
    out = []
    for k in range(num_batches):
        examples = []
        for j in range(L):
            g = k * G + p * L + j
            s, w = schedule.slot(g) if schedule else (0, g)
            examples.append(pack_window(splits[s], (w % counts[s]) * T, T))
        out.append({key: np.stack([e[key] for e in examples]) for key in examples[0]})
    return out


def global_batch(local_batch: dict[str, np.ndarray],
                 sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
    """This process's [L, T] batch as the global [G, T] jax.Arrays laid out by `sharding`
    (`mla_moe.sharding.batch_sharding`): each process passes its own slice."""
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in local_batch.items()
    }
