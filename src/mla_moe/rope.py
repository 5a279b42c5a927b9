"""Rotary position embedding for the decoupled rope dims, with YaRN and its mscale.

Two layouts of the R rope dims (both give the same q.k):
- interleaved (`rope_interleave=True`, the checkpoint layout): pairs (x[2i], x[2i+1]) rotate
  at frequency inv_freq[i];
- half-split (NeoX): pairs (x[i], x[i + R/2]).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from mla_moe.config import ModelConfig


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(config: ModelConfig) -> tuple[np.ndarray, float]:
    """Returns (inv_freq [R/2] float32, attention_factor multiplying cos and sin)."""
    dim, base = config.qk_rope_head_dim, config.rope_theta
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    inv_freq = (1.0 / pos_freqs).astype(np.float32)
    rs = config.rope_scaling
    if rs is None:
        return inv_freq, 1.0
    if rs.attention_factor is not None:
        attention_factor = rs.attention_factor
    elif rs.mscale and rs.mscale_all_dim:
        attention_factor = _yarn_mscale(rs.factor, rs.mscale) / _yarn_mscale(
            rs.factor, rs.mscale_all_dim
        )
    else:
        # Without both mscales HF falls back to the plain YaRN factor (parity decides).
        attention_factor = _yarn_mscale(rs.factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(rs.original_max_position_embeddings / (rotations * 2 * math.pi))) / (
            2 * math.log(base)
        )

    low, high = correction_dim(rs.beta_fast), correction_dim(rs.beta_slow)
    if rs.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = 1.0 - ramp
    inv_freq = (inv_freq / rs.factor) * (1 - extrapolation) + inv_freq * extrapolation
    return inv_freq.astype(np.float32), float(attention_factor)


def softmax_scale(config: ModelConfig) -> float:
    """tau = d_qk^-1/2 * m^2, m from mscale_all_dim (YaRN's attention-temperature fix)."""
    scale = config.qk_head_dim**-0.5
    rs = config.rope_scaling
    if rs is not None and rs.mscale_all_dim:
        m = _yarn_mscale(rs.factor, rs.mscale_all_dim)
        scale = scale * m * m
    return scale


def apply_rope(x_BTxR: jax.Array, positions_BT: jax.Array, config: ModelConfig, *,
               interleave: bool | None = None) -> jax.Array:
    """Rotates the last axis of `x` ([B, T, R] or [B, T, N, R]) at `positions_BT`, in the
    layout `interleave` says (default: the config's `rope_interleave`; the V3.2 indexer always
    rotates half-split pairs)."""
    inv_freq, attention_factor = rope_frequencies(config)
    angles_BTr = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    cos_BTr = (jnp.cos(angles_BTr) * attention_factor).astype(x_BTxR.dtype)
    sin_BTr = (jnp.sin(angles_BTr) * attention_factor).astype(x_BTxR.dtype)
    if x_BTxR.ndim == 4:  # heads axis
        cos_BTr, sin_BTr = cos_BTr[:, :, None], sin_BTr[:, :, None]
    if config.rope_interleave if interleave is None else interleave:
        x1, x2 = x_BTxR[..., 0::2], x_BTxR[..., 1::2]
        y1, y2 = x1 * cos_BTr - x2 * sin_BTr, x2 * cos_BTr + x1 * sin_BTr
        return jnp.stack([y1, y2], axis=-1).reshape(x_BTxR.shape)
    half = x_BTxR.shape[-1] // 2
    x1, x2 = x_BTxR[..., :half], x_BTxR[..., half:]
    return jnp.concatenate([x1 * cos_BTr - x2 * sin_BTr, x2 * cos_BTr + x1 * sin_BTr], axis=-1)
