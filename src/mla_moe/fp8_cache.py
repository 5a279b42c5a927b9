"""FP8 latent cache: FlashMLA's 656-byte token format, packed into one uint8 array per layer.

Per token and layer the latent entry [c_KV (C); k_pe (R)] is stored as
  C float8_e4m3fn values | ceil(C/128) float32 scales (one per 128 values) | R bfloat16 values,
all bitcast to bytes: 512 + 16 + 128 = 656 B for DeepSeek's C = 512, R = 64 (bf16: 1152 B).
The rope key stays in bf16 because its entries carry position information that a shared
per-block scale would blur.

A packed cache is a plain `KVCache` whose latents are uint8 `[B, S, W]` per layer
(`init_cache(..., fp8=True)`): the decoder passes them like any cache, and the cache's
`LatentCodec` quantises on write / dequantises on read when it sees a uint8 cache (cache.py).
Dequantising the whole cache to the compute dtype on every read is what the XLA path does; a
fused kernel would dequantise block by block in registers.

Legend: see layers.py (C kv latent rank, R rope dim, L = C + R, W packed bytes of a slot, Z scale
blocks of a slot).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SCALE_BLOCK = 128
E4M3_MAX = 448.0  # largest finite float8_e4m3fn
_TINY = 1e-12  # scale floor so an all-zero block quantises to zeros, not NaN


def num_scale_blocks(kv_lora_rank: int) -> int:
    """Z, the float32 scales per token: one per 128 latent values."""
    return -(-kv_lora_rank // SCALE_BLOCK)


def packed_width(kv_lora_rank: int, rope_dim: int) -> int:
    """Bytes per token per layer: C (e4m3) + 4 per scale block (f32) + 2 R (bf16)."""
    return kv_lora_rank + 4 * num_scale_blocks(kv_lora_rank) + 2 * rope_dim


def quantize(c_BTC: jax.Array, *, pow2: bool = False) -> tuple[jax.Array, jax.Array]:
    """(e4m3 values [..., C], float32 scales [..., Z]); x ~= value * scale per block.
    pow2: each scale rounded up to a power of two (DeepSeek's ue8m0 scales)."""
    c = c_BTC.shape[-1]
    z = num_scale_blocks(c)
    x = c_BTC.astype(jnp.float32)
    pad = z * SCALE_BLOCK - c
    blocks = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)]).reshape(
        *x.shape[:-1], z, SCALE_BLOCK
    )
    scale_BTZ = jnp.maximum(jnp.max(jnp.abs(blocks), axis=-1), _TINY) / E4M3_MAX
    if pow2:  # the smallest power of two >= scale, exactly (frexp: scale = m 2^e, m in [.5, 1))
        m, e = jnp.frexp(scale_BTZ)
        scale_BTZ = jnp.ldexp(jnp.ones_like(scale_BTZ), jnp.where(m == 0.5, e - 1, e))
    q = jnp.clip(blocks / scale_BTZ[..., None], -E4M3_MAX, E4M3_MAX).astype(jnp.float8_e4m3fn)
    return q.reshape(*x.shape[:-1], z * SCALE_BLOCK)[..., :c], scale_BTZ


def dequantize(q_BTC: jax.Array, scale_BTZ: jax.Array,
               dtype: jax.typing.DTypeLike = jnp.float32) -> jax.Array:
    """The inverse of `quantize`: value * scale per block, [..., C] in `dtype`."""
    c = q_BTC.shape[-1]
    z = scale_BTZ.shape[-1]
    pad = z * SCALE_BLOCK - c
    x = jnp.pad(q_BTC.astype(jnp.float32), [(0, 0)] * (q_BTC.ndim - 1) + [(0, pad)])
    x = x.reshape(*q_BTC.shape[:-1], z, SCALE_BLOCK) * scale_BTZ[..., None]
    return x.reshape(*q_BTC.shape[:-1], z * SCALE_BLOCK)[..., :c].astype(dtype)


def _to_bytes(x: jax.Array) -> jax.Array:
    b = jax.lax.bitcast_convert_type(x, jnp.uint8)
    return b if b.ndim == x.ndim else b.reshape(*x.shape[:-1], -1)


def _from_bytes(b: jax.Array, dtype) -> jax.Array:
    size = jnp.dtype(dtype).itemsize
    if size == 1:
        return jax.lax.bitcast_convert_type(b, dtype)
    return jax.lax.bitcast_convert_type(b.reshape(*b.shape[:-1], -1, size), dtype)


def pack(latent_BTL: jax.Array, kv_lora_rank: int) -> jax.Array:
    """[..., C + R] latent -> [..., W] uint8."""
    q, scale = quantize(latent_BTL[..., :kv_lora_rank])
    rope = latent_BTL[..., kv_lora_rank:].astype(jnp.bfloat16)
    return jnp.concatenate([_to_bytes(q), _to_bytes(scale), _to_bytes(rope)], axis=-1)


def unpack(packed_BSW: jax.Array, kv_lora_rank: int,
           dtype: jax.typing.DTypeLike = jnp.float32) -> jax.Array:
    """[..., W] uint8 -> [..., C + R] latent in `dtype`."""
    c, z = kv_lora_rank, num_scale_blocks(kv_lora_rank)
    q = _from_bytes(packed_BSW[..., :c], jnp.float8_e4m3fn)
    scale = _from_bytes(packed_BSW[..., c : c + 4 * z], jnp.float32)
    rope = _from_bytes(packed_BSW[..., c + 4 * z :], jnp.bfloat16)
    return jnp.concatenate([dequantize(q, scale, dtype), rope.astype(dtype)], axis=-1)


# --- V3.2 indexer keys: Di e4m3 values | one power-of-two float32 scale per 128 (132 B at 128) --
def packed_key_width(index_head_dim: int) -> int:
    """Bytes per token per layer of an FP8 indexer key."""
    return index_head_dim + 4 * num_scale_blocks(index_head_dim)


def pack_key(k_BTI: jax.Array) -> jax.Array:
    """[..., Di] indexer key -> [..., Di + 4 Z] uint8."""
    q, scale = quantize(k_BTI, pow2=True)
    return jnp.concatenate([_to_bytes(q), _to_bytes(scale)], axis=-1)


def unpack_key(packed_BSW: jax.Array, dtype: jax.typing.DTypeLike = jnp.float32) -> jax.Array:
    """[..., W'] uint8 -> [..., Di] indexer key in `dtype`."""
    # W' = Di + 4 ceil(Di / 128) lies in (132 (Z - 1), 132 Z], so Z = ceil(W' / 132).
    z = -(-packed_BSW.shape[-1] // (SCALE_BLOCK + 4))
    di = packed_BSW.shape[-1] - 4 * z
    q = _from_bytes(packed_BSW[..., :di], jnp.float8_e4m3fn)
    scale = _from_bytes(packed_BSW[..., di:], jnp.float32)
    return dequantize(q, scale, dtype)
