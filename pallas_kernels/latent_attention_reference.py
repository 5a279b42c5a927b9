"""Pure-jnp absorbed-MLA decode over the latent cache: chunked XLA reference and dense oracle.

Legend: see layers.py (B batch, T query len: 1 for decode, > 1 for speculative verification,
S cache slots, N heads, C kv latent rank, R rope dim). In a scan step over cache chunks S is
one chunk's slots (the `*_chunk_*` arrays), as in a kernel block.

All N heads attend to one shared key [c; k_pe] (C + R) and one shared value c (C):
  score[b, t, n, s] = sm_scale * (q_latent[b, t, n] . c[b, s] + q_pe[b, t, n] . k_pe[b, s])
Slots s >= lengths_B[b] are garbage (possibly NaN) and are never read into a result. The T
queries are the last T positions of each sequence: query t is at position lengths_B - T + t
and, when causal, sees slots s <= lengths_B - T + t (otherwise all s < lengths_B). A query
that sees no slot returns 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.dispatch import online_softmax_step

DEFAULT_BLOCK_KV = 512


def visible_limit_BT(lengths_B: jax.Array, t: int, causal: bool) -> jax.Array:
    """Last visible slot per (sequence, query): [B, T] int32."""
    lengths_B = lengths_B.astype(jnp.int32)
    if causal:
        return lengths_B[:, None] - t + jnp.arange(t, dtype=jnp.int32)[None, :]
    return jnp.broadcast_to(lengths_B[:, None] - 1, (lengths_B.shape[0], t))


def _scores_BTNS(q_latent_BTNC, q_pe_BTNR, kv_latent_BSC, k_pe_BSR, sm_scale):
    f32 = dict(preferred_element_type=jnp.float32)
    s_BTNS = jnp.einsum("BTNC,BSC->BTNS", q_latent_BTNC, kv_latent_BSC, **f32)
    s_BTNS += jnp.einsum("BTNR,BSR->BTNS", q_pe_BTNR, k_pe_BSR, **f32)
    return s_BTNS * sm_scale


def latent_attention_naive(q_latent_BTNC: jax.Array, q_pe_BTNR: jax.Array,
                           kv_latent_BSC: jax.Array, k_pe_BSR: jax.Array, *,
                           lengths_B: jax.Array, sm_scale: float,
                           causal: bool = True) -> jax.Array:
    """Dense oracle for tests: full [B, T, N, S] softmax in f32."""
    t, s = q_latent_BTNC.shape[1], kv_latent_BSC.shape[1]
    valid_BS1 = (jnp.arange(s)[None, :] < lengths_B[:, None])[..., None]
    kv_BSC = jnp.where(valid_BS1, kv_latent_BSC.astype(jnp.float32), 0.0)
    k_pe_BSR = jnp.where(valid_BS1, k_pe_BSR.astype(jnp.float32), 0.0)
    s_BTNS = _scores_BTNS(q_latent_BTNC.astype(jnp.float32), q_pe_BTNR.astype(jnp.float32),
                          kv_BSC, k_pe_BSR, sm_scale)
    limit_BT = visible_limit_BT(lengths_B, t, causal)
    mask_BT1S = (jnp.arange(s)[None, None, :] <= limit_BT[:, :, None])[:, :, None, :]
    s_BTNS = jnp.where(mask_BT1S, s_BTNS, -jnp.inf)
    m_BTN1 = jnp.max(s_BTNS, axis=-1, keepdims=True)
    p_BTNS = jnp.exp(s_BTNS - jnp.where(jnp.isfinite(m_BTN1), m_BTN1, 0.0))
    l_BTN1 = jnp.sum(p_BTNS, axis=-1, keepdims=True)
    out_BTNC = jnp.einsum("BTNS,BSC->BTNC", p_BTNS / jnp.where(l_BTN1 == 0, 1.0, l_BTN1), kv_BSC)
    return out_BTNC.astype(q_latent_BTNC.dtype)


def latent_attention_reference(q_latent_BTNC: jax.Array, q_pe_BTNR: jax.Array,
                               kv_latent_BSC: jax.Array, k_pe_BSR: jax.Array, *,
                               lengths_B: jax.Array, sm_scale: float, causal: bool = True,
                               block_kv: int = DEFAULT_BLOCK_KV) -> jax.Array:
    """Chunked XLA decode: online softmax over cache chunks of `block_kv` slots (lax.scan).

    Memory is O(B * T * N * (C + block_kv)) besides the inputs. Differentiable by autodiff
    (the kernel path is forward only).
    """
    b, t, n, c = q_latent_BTNC.shape
    s = kv_latent_BSC.shape[1]
    block_kv = min(block_kv, s)
    s_pad = -(-s // block_kv) * block_kv
    num_chunks = s_pad // block_kv

    if s_pad != s:  # a copy of the cache; allocate caches in multiples of block_kv to avoid it
        kv_latent_BSC = jnp.pad(kv_latent_BSC, [(0, 0), (0, s_pad - s), (0, 0)])
        k_pe_BSR = jnp.pad(k_pe_BSR, [(0, 0), (0, s_pad - s), (0, 0)])

    limit_BT1 = visible_limit_BT(lengths_B, t, causal)[..., None]
    lengths_B1 = lengths_B.astype(jnp.int32)[:, None]

    def step(carry, x):
        acc_BTNC, m_BTN1, l_BTN1 = carry
        # Slice the cache in place (no [O, B, block_kv, C] re-layout copy of the whole cache).
        kv_chunk_BSC = lax.dynamic_slice_in_dim(kv_latent_BSC, x * block_kv, block_kv, axis=1)
        k_pe_chunk_BSR = lax.dynamic_slice_in_dim(k_pe_BSR, x * block_kv, block_kv, axis=1)
        pos_S = x * block_kv + jnp.arange(block_kv, dtype=jnp.int32)
        valid_BS1 = (pos_S[None, :] < lengths_B1)[..., None]
        # Zero garbage slots: a masked probability of 0 times a NaN slot would still be NaN.
        kv_chunk_BSC = jnp.where(valid_BS1, kv_chunk_BSC, jnp.zeros((), kv_chunk_BSC.dtype))
        k_pe_chunk_BSR = jnp.where(valid_BS1, k_pe_chunk_BSR, jnp.zeros((), k_pe_chunk_BSR.dtype))
        s_BTNS = _scores_BTNS(q_latent_BTNC, q_pe_BTNR, kv_chunk_BSC, k_pe_chunk_BSR, sm_scale)
        mask_BT1S = (pos_S[None, None, :] <= limit_BT1)[:, :, None, :]
        s_BTNS = jnp.where(mask_BT1S, s_BTNS, -jnp.inf)
        m_new, alpha, p_BTNS, l_BTN1 = online_softmax_step(m_BTN1, l_BTN1, s_BTNS)
        acc_BTNC = alpha * acc_BTNC + jnp.einsum(
            "BTNS,BSC->BTNC", p_BTNS.astype(kv_chunk_BSC.dtype), kv_chunk_BSC,
            preferred_element_type=jnp.float32)
        return (acc_BTNC, m_new, l_BTN1), None

    init = (jnp.zeros((b, t, n, c), jnp.float32), jnp.full((b, t, n, 1), -jnp.inf, jnp.float32),
            jnp.zeros((b, t, n, 1), jnp.float32))
    (acc_BTNC, _, l_BTN1), _ = lax.scan(step, init, jnp.arange(num_chunks, dtype=jnp.int32))
    out_BTNC = acc_BTNC / jnp.where(l_BTN1 == 0.0, 1.0, l_BTN1)
    return out_BTNC.astype(q_latent_BTNC.dtype)

