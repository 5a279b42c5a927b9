"""The two MLA attention forms over explicit masks (XLA path).

naive:    per-head keys [k_nope_h; k_pe] and values v_h decompressed from the latent.
absorbed: W_UK folded into the query, attention over the latent c directly (MQA with one
          C + R wide key and C wide value), W_UV applied after the weighted sum.
Both compute softmax in float32. A row whose mask is all False yields zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG = -1e30


def _softmax_BNTS(scores_BNTS: jax.Array, mask_BTS: jax.Array) -> jax.Array:
    scores_BNTS = jnp.where(mask_BTS[:, None], scores_BNTS, _NEG)
    probs = jax.nn.softmax(scores_BNTS, axis=-1)
    return jnp.where(mask_BTS[:, None], probs, 0.0)


def naive_attention(
    q_nope_BTNH: jax.Array,
    q_pe_BTNR: jax.Array,
    k_nope_BSNH: jax.Array,
    k_pe_BSR: jax.Array,
    v_BSNV: jax.Array,
    mask_BTS: jax.Array,
    sm_scale: float,
) -> jax.Array:
    scores_BNTS = jnp.einsum(
        "BTNH,BSNH->BNTS", q_nope_BTNH, k_nope_BSNH, preferred_element_type=jnp.float32
    ) + jnp.einsum("BTNR,BSR->BNTS", q_pe_BTNR, k_pe_BSR, preferred_element_type=jnp.float32)
    probs_BNTS = _softmax_BNTS(scores_BNTS * sm_scale, mask_BTS)
    return jnp.einsum("BNTS,BSNV->BTNV", probs_BNTS.astype(v_BSNV.dtype), v_BSNV)


def absorbed_attention(
    q_latent_BTNC: jax.Array,
    q_pe_BTNR: jax.Array,
    c_BSC: jax.Array,
    k_pe_BSR: jax.Array,
    mask_BTS: jax.Array,
    sm_scale: float,
) -> jax.Array:
    """Returns the latent output o_latent [B, T, N, C] (W_UV not yet applied)."""
    scores_BNTS = jnp.einsum(
        "BTNC,BSC->BNTS", q_latent_BTNC, c_BSC, preferred_element_type=jnp.float32
    ) + jnp.einsum("BTNR,BSR->BNTS", q_pe_BTNR, k_pe_BSR, preferred_element_type=jnp.float32)
    probs_BNTS = _softmax_BNTS(scores_BNTS * sm_scale, mask_BTS)
    return jnp.einsum("BNTS,BSC->BTNC", probs_BNTS.astype(c_BSC.dtype), c_BSC)


def causal_segment_mask(segment_ids_BT: jax.Array | None, batch: int, length: int) -> jax.Array:
    """[B, T, T]: query t sees key s <= t of the same segment (packed documents)."""
    t = jnp.arange(length)
    mask_TS = t[:, None] >= t[None, :]
    mask_BTS = jnp.broadcast_to(mask_TS, (batch, length, length))
    if segment_ids_BT is not None:
        mask_BTS = mask_BTS & (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])
    return mask_BTS


def cache_mask(query_pos_BT: jax.Array, cache_len: int) -> jax.Array:
    """[B, T, S]: query at absolute position p sees cache slots j <= p."""
    return jnp.arange(cache_len)[None, None, :] <= query_pos_BT[:, :, None]
