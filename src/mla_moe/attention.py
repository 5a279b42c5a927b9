"""The two MLA attention forms over explicit masks (XLA path).

naive:    per-head keys [k_nope_h; k_pe] and values v_h decompressed from the latent.
absorbed: W_UK folded into the query, attention over the latent c directly (MQA with one
          C + R wide key and C wide value), W_UV applied after the weighted sum.
Both compute softmax in float32. A row whose mask is all False yields zeros.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

_NEG = -1e30


def _masked_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax over the last axis of the entries where `mask` (broadcast) is True; a row with
    none yields zeros."""
    probs = jax.nn.softmax(jnp.where(mask, scores, _NEG), axis=-1)
    return jnp.where(mask, probs, 0.0)


def naive_attention(
    q_nope_BTNH: jax.Array,
    q_pe_BTNR: jax.Array,
    k_nope_BSNH: jax.Array,
    k_pe_BSR: jax.Array,
    v_BSNV: jax.Array,
    mask_BTS: jax.Array,
    sm_scale: float,
) -> jax.Array:
    """Per-head MLA attention with materialised keys and values: one score product over the
    A = H + R columns (each head's no-rope key joined with the rope key all heads share),
    softmax in float32 where `mask_BTS` is True (a row with none gives zeros); returns
    [B, T, N, V]. Two products and a sum of their [B, N, T, S] results cost ~20% more on CPU
    (forward and backward)."""
    b, s, n, _ = k_nope_BSNH.shape
    q_BTNA = jnp.concatenate([q_nope_BTNH, q_pe_BTNR.astype(q_nope_BTNH.dtype)], axis=-1)
    k_pe_BSNR = jnp.broadcast_to(k_pe_BSR[:, :, None], (b, s, n, k_pe_BSR.shape[-1]))
    k_BSNA = jnp.concatenate([k_nope_BSNH, k_pe_BSNR.astype(k_nope_BSNH.dtype)], axis=-1)
    scores_BNTS = jnp.einsum("BTNA,BSNA->BNTS", q_BTNA, k_BSNA,
                             preferred_element_type=jnp.float32)
    probs_BNTS = _masked_softmax(scores_BNTS * sm_scale, mask_BTS[:, None])
    return jnp.einsum("BNTS,BSNV->BTNV", probs_BNTS.astype(v_BSNV.dtype), v_BSNV)


def absorbed_attention(
    q_latent_BTNC: jax.Array,
    q_pe_BTNR: jax.Array,
    kv_segments: Sequence[tuple[jax.Array, jax.Array]],
    sm_scale: float,
) -> jax.Array:
    """Returns the latent output o_latent [B, T, N, C] (W_UV not yet applied).

    kv_segments: one or more (kv_BSL, mask_BTS) whose keys together form one softmax, e.g.
    the cache before this step and the step's own new entries, so that the cache is only
    read (its in-place update is independent of the attention). Each kv_BSL is the entry
    [c; k_pe] (L = C + R) used whole: the query [q_latent; q_pe] meets it in one product and
    the weighted sum runs over all L columns (the R extra ones are dropped), so it is never
    sliced or transposed into a copy. The Y = T x N query rows form one matrix per sequence."""
    b, t, n, c = q_latent_BTNC.shape
    q_BYL = jnp.concatenate([q_latent_BTNC, q_pe_BTNR.astype(q_latent_BTNC.dtype)], axis=-1
                            ).reshape(b, t * n, -1)
    scores, masks = [], []
    for kv_BSL, mask_BTS in kv_segments:
        scores.append(jnp.einsum("BYL,BSL->BYS", q_BYL, kv_BSL,
                                 preferred_element_type=jnp.float32))
        masks.append(jnp.repeat(mask_BTS, n, axis=1))  # row t*n + i is query t, head i
    mask_BYS = jnp.concatenate(masks, axis=-1)
    probs_BYS = _masked_softmax(jnp.concatenate(scores, axis=-1) * sm_scale, mask_BYS)
    o_BYL, start = 0.0, 0
    for kv_BSL, _ in kv_segments:
        p_BYS = probs_BYS[..., start : start + kv_BSL.shape[1]]
        o_BYL = o_BYL + jnp.einsum("BYS,BSL->BYL", p_BYS.astype(kv_BSL.dtype), kv_BSL,
                                   preferred_element_type=jnp.float32)
        start += kv_BSL.shape[1]
    return o_BYL[..., :c].reshape(b, t, n, c).astype(q_latent_BTNC.dtype)


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
