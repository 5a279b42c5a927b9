"""Naive-form MLA attention a key block at a time, from the latent (XLA, flash-style).

The keys and values of a block of k keys are up-projected from its latent rows [c_KV; k_pe]
inside the loop, so neither the per-head keys and values of the whole sequence nor the
[N, T, S] scores are ever whole: the forward keeps a running max and sum per query (online
softmax) and saves only the output and the log-sum-exp; the backward (`jax.custom_vjp`)
recomputes each block's keys, values and probabilities. Memory: O(B N T k) for one block's
scores, linear in S. Used by context parallelism (context_parallel.py), where the latent is
gathered whole and the queries are the shard's own.

Legend: see layers.py; k the key block, J the number of key blocks (S = J k).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_NEG = -1e30


def _blocks(x_BS, j: int):
    """[B, S, ...] -> [J, B, S / J, ...], the scan's blocks."""
    b, s = x_BS.shape[:2]
    return x_BS.reshape(b, j, s // j, *x_BS.shape[2:]).swapaxes(0, 1)


def _unblocks(x_JBk):
    x = x_JBk.swapaxes(0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])


def _key_blocks(kv_BSL, k_index_S, k_seg_BS, j: int):
    """The scan's inputs: [J, B, k, L], [J, k], [J, B, k]."""
    return _blocks(kv_BSL, j), k_index_S.reshape(j, -1), _blocks(k_seg_BS, j)


def _block_mask(q_index_T, q_seg_BT, k_index_k, k_seg_Bk):
    """[B, T, k]: the key is at or before the query in the sequence, in its segment."""
    return ((q_index_T[:, None] >= k_index_k[None, :])[None]
            & (q_seg_BT[:, :, None] == k_seg_Bk[:, None, :]))


def _block_scores(q_nope_BTNH, q_pe_BTNR, kv_BkL, mask_BTk, wk_b_CNH, wv_b_CNV, scale):
    """(scores [B, N, T, k] f32, masked, scaled; the block's values [B, k, N, V])."""
    rank, dt = wk_b_CNH.shape[0], q_nope_BTNH.dtype
    c_BkC, k_pe_BkR = kv_BkL[..., :rank], kv_BkL[..., rank:]
    k_nope_BkNH = jnp.einsum("BkC,CNH->BkNH", c_BkC, wk_b_CNH.astype(dt))
    v_BkNV = jnp.einsum("BkC,CNV->BkNV", c_BkC, wv_b_CNV.astype(dt))
    s_BNTk = (jnp.einsum("BTNH,BkNH->BNTk", q_nope_BTNH, k_nope_BkNH,
                         preferred_element_type=jnp.float32)
              + jnp.einsum("BTNR,BkR->BNTk", q_pe_BTNR, k_pe_BkR.astype(dt),
                           preferred_element_type=jnp.float32))
    return jnp.where(mask_BTk[:, None], s_BNTk * scale, _NEG), v_BkNV


def _forward(q_nope_BTNH, q_pe_BTNR, kv_BSL, index, wk_b_CNH, wv_b_CNV, scale, j):
    b, t, n, _ = q_nope_BTNH.shape
    v = wv_b_CNV.shape[-1]
    q_index_T, q_seg_BT, k_index_S, k_seg_BS = index

    def step(carry, xs):
        m_BNT, l_BNT, acc_BTNV = carry
        kv_BkL, k_index_k, k_seg_Bk = xs
        # As in the backward: without the tie, JAX (differentiating a scan around this one)
        # computes every block's masks, keys and values ahead of the loop and keeps them all.
        (kv_BkL, k_index_k, k_seg_Bk), m_BNT = jax.lax.optimization_barrier(
            ((kv_BkL, k_index_k, k_seg_Bk), m_BNT))
        mask_BTk = _block_mask(q_index_T, q_seg_BT, k_index_k, k_seg_Bk)
        s_BNTk, v_BkNV = _block_scores(q_nope_BTNH, q_pe_BTNR, kv_BkL, mask_BTk, wk_b_CNH,
                                       wv_b_CNV, scale)
        m_new = jnp.maximum(m_BNT, s_BNTk.max(-1))
        p_BNTk = jnp.where(mask_BTk[:, None], jnp.exp(s_BNTk - m_new[..., None]), 0.0)
        corr_BNT = jnp.exp(m_BNT - m_new)
        acc_BTNV = acc_BTNV * corr_BNT.transpose(0, 2, 1)[..., None] + jnp.einsum(
            "BNTk,BkNV->BTNV", p_BNTk.astype(v_BkNV.dtype), v_BkNV,
            preferred_element_type=jnp.float32)
        return (m_new, l_BNT * corr_BNT + p_BNTk.sum(-1), acc_BTNV), None

    init = (jnp.full((b, n, t), _NEG, jnp.float32), jnp.zeros((b, n, t), jnp.float32),
            jnp.zeros((b, t, n, v), jnp.float32))
    (m_BNT, l_BNT, acc_BTNV), _ = jax.lax.scan(
        step, init, _key_blocks(kv_BSL, k_index_S, k_seg_BS, j))
    l_safe = jnp.where(l_BNT > 0, l_BNT, 1.0)  # a query with no visible key: zeros
    o_BTNV = acc_BTNV / l_safe.transpose(0, 2, 1)[..., None]
    lse_BNT = jnp.where(l_BNT > 0, m_BNT + jnp.log(l_safe), jnp.inf)
    return o_BTNV.astype(q_nope_BTNH.dtype), lse_BNT


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def latent_attention_blocked(q_nope_BTNH, q_pe_BTNR, kv_BSL, index, wk_b_CNH, wv_b_CNV,
                             scale: float, num_blocks: int):
    """Naive MLA attention over the latent kv_BSL = [c_KV; k_pe] [B, S, C + R], in
    `num_blocks` key blocks (S divisible by it): o [B, T, N, V], as
    `attention.naive_attention` over keys and values up-projected with wk_b_CNH / wv_b_CNV.

    index: (q_index_T, q_seg_BT, k_index_S, k_seg_BS), int: a query sees a key whose
    sequence index is <= its own and whose segment id equals its own (the mask, a block at a
    time)."""
    return _forward(q_nope_BTNH, q_pe_BTNR, kv_BSL, index, wk_b_CNH, wv_b_CNV, scale,
                    num_blocks)[0]


def _fwd(q_nope, q_pe, kv, index, wk_b, wv_b, scale, j):
    o, lse = _forward(q_nope, q_pe, kv, index, wk_b, wv_b, scale, j)
    return o, (q_nope, q_pe, kv, index, wk_b, wv_b, o, lse)


def _bwd(scale, j, res, do_BTNV):
    q_nope, q_pe, kv, index, wk_b, wv_b, o, lse_BNT = res
    q_index_T, q_seg_BT, k_index_S, k_seg_BS = index
    rank, dt = wk_b.shape[0], q_nope.dtype
    do_BTNV_all = do_BTNV.astype(jnp.float32)
    d_BNT = jnp.einsum("BTNV,BTNV->BNT", do_BTNV_all, o.astype(jnp.float32))

    def step(carry, xs):
        dq_nope, dq_pe, dwk, dwv = carry
        kv_BkL, k_index_k, k_seg_Bk = xs
        # Ties the block to the loop's carry: differentiated inside a scan (the layers' scan),
        # JAX would otherwise compute what depends on the block alone (keys, values, masks)
        # for every block ahead of the loop and keep them all.
        (kv_BkL, k_index_k, k_seg_Bk), dq_nope = jax.lax.optimization_barrier(
            ((kv_BkL, k_index_k, k_seg_Bk), dq_nope))
        do_BTNV = do_BTNV_all
        mask_BTk = _block_mask(q_index_T, q_seg_BT, k_index_k, k_seg_Bk)
        c_BkC = kv_BkL[..., :rank]
        s_BNTk, v_BkNV = _block_scores(q_nope, q_pe, kv_BkL, mask_BTk, wk_b, wv_b, scale)
        p_BNTk = jnp.where(mask_BTk[:, None], jnp.exp(s_BNTk - lse_BNT[..., None]), 0.0)
        dv_BkNV = jnp.einsum("BNTk,BTNV->BkNV", p_BNTk, do_BTNV)
        dp_BNTk = jnp.einsum("BTNV,BkNV->BNTk", do_BTNV, v_BkNV.astype(jnp.float32))
        ds_BNTk = p_BNTk * (dp_BNTk - d_BNT[..., None]) * scale
        k_nope_BkNH = jnp.einsum("BkC,CNH->BkNH", c_BkC, wk_b.astype(dt))
        dq_nope = dq_nope + jnp.einsum("BNTk,BkNH->BTNH", ds_BNTk, k_nope_BkNH.astype(
            jnp.float32))
        dq_pe = dq_pe + jnp.einsum("BNTk,BkR->BTNR", ds_BNTk,
                                   kv_BkL[..., rank:].astype(jnp.float32))
        dk_nope_BkNH = jnp.einsum("BNTk,BTNH->BkNH", ds_BNTk, q_nope.astype(jnp.float32))
        dk_pe_BkR = jnp.einsum("BNTk,BTNR->BkR", ds_BNTk, q_pe.astype(jnp.float32))
        dc_BkC = (jnp.einsum("BkNH,CNH->BkC", dk_nope_BkNH, wk_b.astype(jnp.float32))
                  + jnp.einsum("BkNV,CNV->BkC", dv_BkNV, wv_b.astype(jnp.float32)))
        dwk = dwk + jnp.einsum("BkC,BkNH->CNH", c_BkC.astype(jnp.float32), dk_nope_BkNH)
        dwv = dwv + jnp.einsum("BkC,BkNV->CNV", c_BkC.astype(jnp.float32), dv_BkNV)
        dkv_BkL = jnp.concatenate([dc_BkC, dk_pe_BkR], axis=-1).astype(kv_BkL.dtype)
        return (dq_nope, dq_pe, dwk, dwv), dkv_BkL

    f32 = lambda x: jnp.zeros(x.shape, jnp.float32)  # noqa: E731
    (dq_nope, dq_pe, dwk, dwv), dkv_JBkL = jax.lax.scan(
        step, (f32(q_nope), f32(q_pe), f32(wk_b), f32(wv_b)),
        _key_blocks(kv, k_index_S, k_seg_BS, j))
    return (dq_nope.astype(q_nope.dtype), dq_pe.astype(q_pe.dtype), _unblocks(dkv_JBkL),
            (None,) * 4, dwk.astype(wk_b.dtype), dwv.astype(wv_b.dtype))


latent_attention_blocked.defvjp(_fwd, _bwd)
