"""Next-token selection: greedy, or temperature / top-k / top-p sampling from a seeded key.

Legend: see layers.py (B batch, U vocabulary).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

_NEG = -jnp.inf


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How to pick the next token. Hashable, so it can be a static argument of a jitted loop.

    temperature: 0 means greedy (argmax); otherwise logits are divided by it.
    top_k: keep only the k most likely tokens (0: no limit).
    top_p: keep the smallest set of most likely tokens whose probability reaches p (1: all).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        """Whether this picks the argmax (temperature 0 or top_k 1), ignoring the key."""
        return self.temperature == 0 or self.top_k == 1


GREEDY = Sampling(temperature=0.0)


def filter_logits(logits_BU: jax.Array, sampling: Sampling) -> jax.Array:
    """Tempered float32 logits with the tokens outside top-k / top-p set to -inf."""
    logits_BU = logits_BU.astype(jnp.float32) / sampling.temperature
    vocab = logits_BU.shape[-1]
    if 0 < sampling.top_k < vocab:
        kth_B1 = jax.lax.top_k(logits_BU, sampling.top_k)[0][:, -1:]
        logits_BU = jnp.where(logits_BU < kth_B1, _NEG, logits_BU)
    if sampling.top_p < 1:
        sorted_BU = jnp.sort(logits_BU, axis=-1)[:, ::-1]
        probs_BU = jax.nn.softmax(sorted_BU, axis=-1)
        # A token is kept if the mass strictly before it is still below p (so the most likely
        # token always survives); the threshold is the smallest kept logit.
        before_BU = jnp.cumsum(probs_BU, axis=-1) - probs_BU
        kept_BU = before_BU < sampling.top_p
        threshold_B1 = jnp.min(jnp.where(kept_BU, sorted_BU, jnp.inf), axis=-1, keepdims=True)
        logits_BU = jnp.where(logits_BU < threshold_B1, _NEG, logits_BU)
    return logits_BU


def sample(logits_BU: jax.Array, key: jax.Array, sampling: Sampling | None) -> jax.Array:
    """int32 [B] next tokens; `sampling=None` (or temperature 0) is greedy and ignores `key`."""
    if sampling is None or sampling.greedy:
        return jnp.argmax(logits_BU, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits_BU, sampling), axis=-1).astype(
        jnp.int32
    )
