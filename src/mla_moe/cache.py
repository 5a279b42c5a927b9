"""The decode cache: per layer only the latent c_KV and the rope key, nothing per head."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from mla_moe.config import ModelConfig


@struct.dataclass
class KVCache:
    """`latents[i]` is [B, S, C + R] for layer i (post-norm c_KV, post-rope k_pe): one array
    per layer, so that a decode step reads and updates each in place.

    `lengths_B` counts the valid slots of each sequence; a call with T new tokens writes
    slots lengths_B .. lengths_B + T - 1 and returns the cache with lengths_B + T. Slots past
    a sequence's length may hold stale values: they are masked out, so a generator may move
    `lengths_B` back (e.g. after right-padded prefill or rejected speculative tokens).
    """

    latents: tuple[jax.Array, ...]
    lengths_B: jax.Array

    @property
    def max_length(self) -> int:
        return self.latents[0].shape[1]

    def bytes_per_token_per_layer(self) -> int:
        x = self.latents[0]
        return x.shape[-1] * x.dtype.itemsize


def init_cache(config: ModelConfig, batch: int, max_length: int, dtype=None) -> KVCache:
    """An empty cache for `batch` sequences of up to `max_length` tokens."""
    if max_length > config.max_position_embeddings:
        raise ValueError(
            f"max_length={max_length} exceeds max_position_embeddings="
            f"{config.max_position_embeddings}"
        )
    dtype = jnp.dtype(dtype or config.dtype)
    width = config.kv_lora_rank + config.qk_rope_head_dim
    latents = tuple(jnp.zeros((batch, max_length, width), dtype)
                    for _ in range(config.num_hidden_layers))
    return KVCache(latents=latents, lengths_B=jnp.zeros((batch,), jnp.int32))
