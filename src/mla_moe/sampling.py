"""Next-token selection: greedy, or temperature / top-k / top-p sampling from a seeded key.

Legend: B batch, V vocabulary.
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
        return self.temperature == 0 or self.top_k == 1


GREEDY = Sampling(temperature=0.0)


def filter_logits(logits_BV: jax.Array, sampling: Sampling) -> jax.Array:
    """Tempered float32 logits with the tokens outside top-k / top-p set to -inf."""
    logits_BV = logits_BV.astype(jnp.float32) / sampling.temperature
    vocab = logits_BV.shape[-1]
    if 0 < sampling.top_k < vocab:
        kth_B1 = jax.lax.top_k(logits_BV, sampling.top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, _NEG, logits_BV)
    if sampling.top_p < 1:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        # A token is kept if the mass strictly before it is still below p (so the most likely
        # token always survives); the threshold is the smallest kept logit.
        before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
        kept_BV = before_BV < sampling.top_p
        threshold_B1 = jnp.min(jnp.where(kept_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV < threshold_B1, _NEG, logits_BV)
    return logits_BV


def sample(logits_BV: jax.Array, key: jax.Array, sampling: Sampling | None) -> jax.Array:
    """int32 [B] next tokens; `sampling=None` (or temperature 0) is greedy and ignores `key`."""
    if sampling is None or sampling.greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits_BV, sampling), axis=-1).astype(
        jnp.int32
    )
