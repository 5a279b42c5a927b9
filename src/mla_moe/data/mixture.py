"""Training on several token stores at once, sampled by weight.

    data.path = "/data/web,/data/code"      # comma-separated token stores
    data.weights = "0.7,0.3"                # their shares of the examples ('' = equal)

The mixture is a pure function of the example's global index, so the stream is the same for
any number of processes and threads, and the Grain iterator's checkpoint (its position) is all
a resume needs. Global examples come in periods of `PERIOD`: in each, source s fills exactly
`counts[s]` slots (its weight times PERIOD, rounded by largest remainder), in an order drawn
from `np.random.default_rng([seed, period])`. Source s's j-th slot overall reads its j-th
window in its own shuffled order (reshuffled each epoch of that source, as for one store).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from mla_moe.data.token_store import TokenSplit
from mla_moe.errors import ConfigError

PERIOD = 4096


def source_paths(path_spec: str) -> list[str]:
    """The stores named by `data.path` (comma-separated; '' gives [])."""
    return [p.strip() for p in (path_spec or "").split(",") if p.strip()]


def parse_weights(path_spec: str, weights: str | Sequence[float]) -> list[float]:
    """The normalized weights of the sources of `data.path` from `data.weights` (a
    comma-separated string or a sequence; '' = equal). A ConfigError names what is wrong."""
    n = max(1, len(source_paths(path_spec)))
    if isinstance(weights, str):
        parts = [w.strip() for w in weights.split(",")] if weights.strip() else []
        try:
            values = [float(w) for w in parts]
        except ValueError:
            raise ConfigError(f"data.weights={weights!r} must be comma-separated numbers, "
                              "one per source of data.path") from None
    else:
        values = [float(w) for w in weights]
    if not values:
        return [1.0 / n] * n
    if len(values) != n:
        raise ConfigError(
            f"data.weights has {len(values)} value{'s' * (len(values) != 1)} for the {n} "
            f"source{'s' * (n != 1)} of data.path={path_spec!r}; give one weight per source, "
            "or '' for equal weights")
    if not all(np.isfinite(v) and v > 0 for v in values):
        raise ConfigError(f"data.weights must all be positive numbers, got {values}")
    total = sum(values)
    weights_n = [v / total for v in values]
    if min(weights_n) * PERIOD < 0.5:
        raise ConfigError(f"data.weights: a weight below 1/{PERIOD} of the total would never "
                          f"be sampled, got {values}")
    return weights_n


def period_counts(weights: Sequence[float], period: int) -> np.ndarray:
    """Slots per source in each period: weight x period, rounded by largest remainder (ties to
    the lower source index), each at least one."""
    exact = np.asarray(weights, np.float64) * period
    counts = np.floor(exact).astype(np.int64)
    order = sorted(range(len(weights)), key=lambda s: (-(exact[s] - counts[s]), s))
    for s in order[: period - int(counts.sum())]:
        counts[s] += 1
    return np.maximum(counts, 1)  # parse_weights guarantees this changes nothing


class Schedule:
    """Which source fills each global example slot, and the how-many-th of that source it is."""

    def __init__(self, weights: Sequence[float], seed: int, period: int | None = None):
        self.counts = period_counts(weights, period or PERIOD)
        self.period, self.seed = int(self.counts.sum()), seed
        self._period_slots = functools.lru_cache(maxsize=8)(self._slots)

    def _slots(self, p: int) -> tuple[np.ndarray, np.ndarray]:
        source = np.repeat(np.arange(self.counts.size), self.counts)
        source = source[np.random.default_rng([self.seed, p]).permutation(self.period)]
        rank = np.empty(self.period, np.int64)
        for s in range(self.counts.size):
            where = np.flatnonzero(source == s)
            rank[where] = np.arange(where.size)
        return source, rank

    def slot(self, g: int) -> tuple[int, int]:
        """(source, its slot index j) of global example `g`."""
        p, r = divmod(int(g), self.period)
        source, rank = self._period_slots(p)
        s = int(source[r])
        return s, p * int(self.counts[s]) + int(rank[r])


class TokenMixture:
    """One split of several token stores with their weights; reads like one source for the
    run's summary (`num_tokens`, `vocab_size`, `unigram_entropy`)."""

    def __init__(self, splits: Sequence, weights: Sequence[float]):
        self.splits, self.weights = list(splits), list(weights)
        self.num_tokens = sum(s.num_tokens for s in self.splits)
        if any(type(s.num_tokens) is not int for s in self.splits):  # a raw source's estimate
            self.num_tokens = type(next(s.num_tokens for s in self.splits
                                        if type(s.num_tokens) is not int))(self.num_tokens)
        self.vocab_size = max(s.vocab_size for s in self.splits)

    def unigram_entropy(self, max_tokens: int = 1 << 22) -> float:
        """Entropy (nats) of the weighted mixture of the sources' token distributions."""
        p = np.zeros(self.vocab_size)
        for split, w in zip(self.splits, self.weights):
            counts = np.bincount(split.read(0, min(split.num_tokens, max_tokens)).astype(
                np.int64), minlength=self.vocab_size)
            p += w * counts / counts.sum()
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())


def open_split(paths: Sequence[str], split: str, weights: Sequence[float]):
    """A TokenSplit for one store, a TokenMixture for several."""
    splits = [TokenSplit(p, split) for p in paths]
    return splits[0] if len(splits) == 1 else TokenMixture(splits, weights)
