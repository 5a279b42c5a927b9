"""The decode cache: per layer only the latent c_KV and the rope key, nothing per head.

Everything a cache is lives here:
  `KVCache`        the arrays: one [B, S, W] per layer and the valid lengths;
  `init_cache`     an empty one, in a float dtype or FP8-packed, for the decoder layers or the
                   MTP modules;
  `LatentCodec`    how a latent entry [c_KV; k_pe] is stored: cast to the cache's float dtype,
                   or packed into bytes when the cache is uint8 (the format is fp8_cache.py's);
  `write_entries`  the new entries written in place at each row's length.

Legend: see layers.py; T the new tokens. A cache array is [B, S, W] as stored: W is L for a float
cache, the packed bytes of fp8_cache.py for an FP8 one.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from mla_moe import fp8_cache
from mla_moe.config import ModelConfig


@struct.dataclass
class KVCache:
    """`latents[i]` is [B, S, W] for layer i (post-norm c_KV, post-rope k_pe, as stored by
    `LatentCodec`): one array per layer, so that a decode step reads and updates each in place.

    `lengths_B` counts the valid slots of each sequence; a call with T new tokens writes
    slots lengths_B .. lengths_B + T - 1 and returns the cache with lengths_B + T. Slots past
    a sequence's length may hold stale values: they are masked out, so a generator may move
    `lengths_B` back (e.g. after right-padded prefill or rejected speculative tokens).
    The MTP modules' cache is a `KVCache` too, one array per module (`init_cache(mtp=True)`).
    """

    latents: tuple[jax.Array, ...]
    lengths_B: jax.Array
    # V3.2 (an indexer per layer): `index_keys[i]` is layer i's indexer keys [B, S, Di] (or
    # FP8-packed bytes, `IndexKeyCodec`), written beside the latents; () otherwise.
    index_keys: tuple[jax.Array, ...] = ()

    def layer(self, i: int) -> jax.Array | tuple[jax.Array, jax.Array]:
        """What layer i's attention takes: its latents, or (latents, indexer keys)."""
        return (self.latents[i], self.index_keys[i]) if self.index_keys else self.latents[i]

    @property
    def max_length(self) -> int:
        """S, the slots per sequence."""
        return self.latents[0].shape[1]

    @property
    def packed(self) -> bool:
        """Whether the entries are FP8-packed bytes (fp8_cache.py)."""
        return self.latents[0].dtype == jnp.uint8

    def bytes_per_token_per_layer(self) -> int:
        """Stored bytes of one token's entry in one layer (latent and indexer key)."""
        arrays = (self.latents[0],) + self.index_keys[:1]
        return sum(x.shape[-1] * x.dtype.itemsize for x in arrays)


def init_cache(config: ModelConfig, batch: int, max_length: int,
               dtype: jax.typing.DTypeLike | None = None, *,
               fp8: bool = False, mtp: bool = False) -> KVCache:
    """An empty cache for `batch` sequences of up to `max_length` tokens.

    dtype: the entries' float dtype (default: the config's compute dtype). fp8: FP8-packed
    entries instead (fp8_cache.py; `dtype` is then unused). mtp: one array per MTP module
    (the speculative drafter's cache) instead of one per decoder layer.
    """
    if max_length > config.max_position_embeddings:
        raise ValueError(
            f"max_length={max_length} exceeds max_position_embeddings="
            f"{config.max_position_embeddings}"
        )
    layers = config.num_nextn_predict_layers if mtp else config.num_hidden_layers
    if mtp and not layers:
        raise ValueError("init_cache(mtp=True): the config has num_nextn_predict_layers=0")
    if fp8:
        width = fp8_cache.packed_width(config.kv_lora_rank, config.qk_rope_head_dim)
        dtype = jnp.uint8
    else:
        width = config.kv_lora_rank + config.qk_rope_head_dim
        dtype = jnp.dtype(dtype or config.dtype)
    latents = tuple(jnp.zeros((batch, max_length, width), dtype) for _ in range(layers))
    keys = ()
    if config.has_indexer:
        di = config.index_head_dim
        key_width, key_dtype = ((fp8_cache.packed_key_width(di), jnp.uint8) if fp8
                                else (di, dtype))
        keys = tuple(jnp.zeros((batch, max_length, key_width), key_dtype)
                     for _ in range(layers))
    return KVCache(latents=latents, lengths_B=jnp.zeros((batch,), jnp.int32), index_keys=keys)


@dataclasses.dataclass(frozen=True)
class LatentCodec:
    """Latent entries [..., C + R] in the compute dtype <-> a cache array's stored [..., W]."""

    kv_lora_rank: int
    stored_dtype: jnp.dtype
    compute_dtype: jnp.dtype

    @classmethod
    def of(cls, cache_BSW: jax.Array, kv_lora_rank: int, compute_dtype: jax.typing.DTypeLike
           ) -> LatentCodec:
        """The codec of `cache_BSW`: FP8-packed when it is uint8, else a cast."""
        return cls(kv_lora_rank, jnp.dtype(cache_BSW.dtype), jnp.dtype(compute_dtype))

    @property
    def packed(self) -> bool:
        """Whether entries are stored FP8-packed (fp8_cache.py)."""
        return self.stored_dtype == jnp.uint8

    def write(self, latent_BTL: jax.Array) -> jax.Array:
        """[..., C + R] latent -> [..., W] as stored."""
        if self.packed:
            return fp8_cache.pack(latent_BTL, self.kv_lora_rank)
        return latent_BTL.astype(self.stored_dtype)

    def read(self, stored_BSW: jax.Array) -> jax.Array:
        """[..., W] as stored -> [..., C + R] latent in the compute dtype."""
        if self.packed:
            return fp8_cache.unpack(stored_BSW, self.kv_lora_rank, self.compute_dtype)
        return stored_BSW.astype(self.compute_dtype)


@dataclasses.dataclass(frozen=True)
class IndexKeyCodec:
    """V3.2 indexer keys [..., Di] in the compute dtype <-> a key cache's stored [..., W']:
    a cast, or FP8 bytes (e4m3 with one power-of-two scale per 128 values, fp8_cache.py)
    when the cache is uint8."""

    stored_dtype: jnp.dtype
    compute_dtype: jnp.dtype

    @classmethod
    def of(cls, keys_BSW: jax.Array, compute_dtype: jax.typing.DTypeLike) -> IndexKeyCodec:
        return cls(jnp.dtype(keys_BSW.dtype), jnp.dtype(compute_dtype))

    def write(self, k_BTI: jax.Array) -> jax.Array:
        if self.stored_dtype == jnp.uint8:
            return fp8_cache.pack_key(k_BTI)
        return k_BTI.astype(self.stored_dtype)

    def read(self, stored_BSW: jax.Array) -> jax.Array:
        if self.stored_dtype == jnp.uint8:
            return fp8_cache.unpack_key(stored_BSW, self.compute_dtype)
        return stored_BSW.astype(self.compute_dtype)


def _after(x: jax.Array, dep: jax.Array) -> jax.Array:
    """`x` unchanged, with a data dependency on `dep`: adds 0 x dep[0...0] with a NaN made 0,
    which is 0 for every value. An optimization_barrier does not give XLA this ordering."""
    zero = jnp.nan_to_num(dep.reshape(-1)[0].astype(jnp.float32) * 0.0, nan=0.0)
    if jnp.issubdtype(x.dtype, jnp.integer):
        return x | zero.astype(x.dtype)
    return x + zero.astype(x.dtype)


def write_entries(cache_BSW: jax.Array, new_BTW: jax.Array, lengths_B: jax.Array, *,
                  after: jax.Array | None = None) -> jax.Array:
    """`cache_BSW` with row b's T new entries at slots lengths_B[b] .. lengths_B[b] + T - 1:
    one scatter for the whole batch, in place on a donated cache.

    after: an array computed from the cache as it was (the attention output). The write then
    waits for it, so a read of the old cache runs first and XLA updates the cache in place
    instead of copying it (tests/test_decode.py checks the compiled step's temporaries).
    """
    if after is not None:
        new_BTW = _after(new_BTW, after)

    def write_row(cache_SW, new_TW, start):
        return jax.lax.dynamic_update_slice(cache_SW, new_TW, (start, 0))

    return jax.vmap(write_row)(cache_BSW, new_BTW, lengths_B)
