"""Pure-jnp sparse absorbed-MLA decode (DeepSeek-V3.2's DSA): blocked XLA reference and oracle.

Legend: see layers.py (B batch, T query len, S cache slots, N heads, C kv latent rank, R rope
dim, L = C + R the packed cache row, K selected slots per query). In a scan step over blocks
of indices, S is one block's selected slots, as in a kernel block.

Query t of sequence b attends only to the cache slots indices_BTK[b, t, :]; an index < 0
selects nothing (padding when fewer than K slots are visible). Every non-negative index is a
valid, causally visible slot: the caller (the indexer's top-k) guarantees it, so no causal
mask is applied here. The top-k never repeats an index; a repeated one counts once per listing
in the blocked reference (as in the kernels) and once in the mask-based oracle. Each selected
slot gives the shared key [c; k_pe] and value c of all N heads:
  score[b, t, n, k] = sm_scale * (q_latent[b, t, n] . c[b, i] + q_pe[b, t, n] . k_pe[b, i]),
  i = indices_BTK[b, t, k]
A query with no valid index returns 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.dispatch import online_softmax_step
from pallas_kernels.latent_attention_reference import latent_attention_naive

DEFAULT_BLOCK_K = 256


def selection_mask_BTS(indices_BTK: jax.Array, s: int) -> jax.Array:
    """[B, T, S] bool: slot s is among query (b, t)'s valid indices."""
    b, t, _ = indices_BTK.shape
    rows_BT1 = jnp.arange(b)[:, None, None]
    queries_BT1 = jnp.arange(t)[None, :, None]
    # Negative indices are moved out of range and dropped by the scatter.
    slots_BTK = jnp.where(indices_BTK >= 0, indices_BTK, s)
    return jnp.zeros((b, t, s), bool).at[rows_BT1, queries_BT1, slots_BTK].set(True, mode="drop")


def sparse_latent_attention_naive(q_latent_BTNC: jax.Array, q_pe_BTNR: jax.Array,
                                  kv_BSL: jax.Array, indices_BTK: jax.Array, *,
                                  sm_scale: float) -> jax.Array:
    """Dense oracle for tests: the [B, T, S] mask built from the indices, then the dense
    `latent_attention_naive` over the whole cache, one query position at a time (its mask is
    per sequence, not per query). The mask enters as an additive score bias through one extra
    rope column (query 1, key 0 or -inf), and unselected slots are zeroed, so garbage in them
    cannot reach the result."""
    c = q_latent_BTNC.shape[-1]
    b, s, _ = kv_BSL.shape
    f32 = jnp.float32
    mask_BTS = selection_mask_BTS(indices_BTK, s)
    outs = []
    for t in range(q_latent_BTNC.shape[1]):
        sel_BS1 = mask_BTS[:, t, :, None]
        kv_t_BSL = jnp.where(sel_BS1, kv_BSL.astype(f32), 0.0)
        bias_BS1 = jnp.where(sel_BS1, 0.0, -jnp.inf)
        q_pe_B1NR = q_pe_BTNR[:, t:t + 1].astype(f32)
        ones_B1N1 = jnp.ones(q_pe_B1NR.shape[:-1] + (1,), f32)
        out_B1NC = latent_attention_naive(
            q_latent_BTNC[:, t:t + 1].astype(f32),
            jnp.concatenate([q_pe_B1NR, ones_B1N1], axis=-1),
            kv_t_BSL[..., :c], jnp.concatenate([kv_t_BSL[..., c:], bias_BS1], axis=-1),
            lengths_B=jnp.full((b,), s, jnp.int32), sm_scale=sm_scale, causal=False)
        outs.append(out_B1NC)
    return jnp.concatenate(outs, axis=1).astype(q_latent_BTNC.dtype)


def sparse_latent_attention_reference(q_latent_BTNC: jax.Array, q_pe_BTNR: jax.Array,
                                      kv_BSL: jax.Array, indices_BTK: jax.Array, *,
                                      sm_scale: float,
                                      block_k: int = DEFAULT_BLOCK_K) -> jax.Array:
    """Blocked XLA sparse decode: a `lax.scan` over blocks of `block_k` indices gathers those
    cache rows ([B, T, block_k, L]) and folds them into an online softmax.

    Memory is O(B * T * (N * C + block_k * L)) besides the inputs, whatever S and K are.
    Differentiable by autodiff (the kernel path is forward only)."""
    b, t, n, c = q_latent_BTNC.shape
    k = indices_BTK.shape[-1]
    block_k = min(block_k, k)
    k_pad = -(-k // block_k) * block_k
    indices_BTK = indices_BTK.astype(jnp.int32)
    if k_pad != k:  # padding selects nothing
        indices_BTK = jnp.pad(indices_BTK, [(0, 0), (0, 0), (0, k_pad - k)], constant_values=-1)
    gather_rows = jax.vmap(lambda kv_SL, idx_TS: kv_SL[idx_TS])  # per sequence: [T, S, L]
    f32 = dict(preferred_element_type=jnp.float32)

    def step(carry, j):
        acc_BTNC, m_BTN1, l_BTN1 = carry
        idx_BTS = lax.dynamic_slice_in_dim(indices_BTK, j * block_k, block_k, axis=2)
        valid_BTS = idx_BTS >= 0
        kv_BTSL = gather_rows(kv_BSL, jnp.where(valid_BTS, idx_BTS, 0))
        # Zero skipped slots: a masked probability of 0 times a NaN row would still be NaN.
        kv_BTSL = jnp.where(valid_BTS[..., None], kv_BTSL, jnp.zeros((), kv_BTSL.dtype))
        kv_BTSC, k_pe_BTSR = kv_BTSL[..., :c], kv_BTSL[..., c:]
        s_BTNS = jnp.einsum("BTNC,BTSC->BTNS", q_latent_BTNC, kv_BTSC, **f32)
        s_BTNS += jnp.einsum("BTNR,BTSR->BTNS", q_pe_BTNR, k_pe_BTSR, **f32)
        s_BTNS = jnp.where(valid_BTS[:, :, None, :], s_BTNS * sm_scale, -jnp.inf)
        m_new, alpha, p_BTNS, l_BTN1 = online_softmax_step(m_BTN1, l_BTN1, s_BTNS)
        acc_BTNC = alpha * acc_BTNC + jnp.einsum(
            "BTNS,BTSC->BTNC", p_BTNS.astype(kv_BTSC.dtype), kv_BTSC, **f32)
        return (acc_BTNC, m_new, l_BTN1), None

    init = (jnp.zeros((b, t, n, c), jnp.float32), jnp.full((b, t, n, 1), -jnp.inf, jnp.float32),
            jnp.zeros((b, t, n, 1), jnp.float32))
    (acc_BTNC, _, l_BTN1), _ = lax.scan(step, init,
                                        jnp.arange(k_pad // block_k, dtype=jnp.int32))
    out_BTNC = acc_BTNC / jnp.where(l_BTN1 == 0.0, 1.0, l_BTN1)
    return out_BTNC.astype(q_latent_BTNC.dtype)
