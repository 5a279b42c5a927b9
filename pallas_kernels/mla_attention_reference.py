"""Pure-jnp MLA attention: the chunked XLA reference and the dense naive oracle.

Legend: see layers.py (B batch, T query len, S key len, N heads, H qk nope head dim, R rope
dim, V value head dim). In a scan step over key chunks S is one chunk's keys, as in a kernel
block, and O counts the chunks.

Conventions shared with the Pallas kernel (`mla_attention.py`):
  score[b, n, t, s] = sm_scale * (q_nope[b, t, n] . k_nope[b, s, n] + q_pe[b, t, n] . k_pe[b, s])
  with k_pe one key per token shared by every head.
  Causal with T != S: the T queries are the *last* T positions of the S keys, so query t sits
  at absolute position S - T + t and sees keys s <= S - T + t (T == S is the usual lower
  triangle; T < S is prefill continuing a prefix; when T > S the first T - S queries see no
  key at all).
  Positions: `q_positions` [T] / `k_positions` [S] (ints, shared by the batch) replace that
  convention when given: query t sees key s when k_positions[s] <= q_positions[t] (the zigzag
  layout of context parallelism puts a shard's queries at two distant chunks).
  Segment ids: a token attends only to keys with an equal segment id (packed documents).
  A query that sees no key (fully masked row) gets output 0 and gradient 0, never NaN.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.dispatch import online_softmax_step

DEFAULT_BLOCK_KV = 512


def normalize_segment_ids(segment_ids: Any, t: int,
                          s: int) -> tuple[jax.Array, jax.Array] | None:
    """Returns (q_segment_ids_BT, kv_segment_ids_BS) as int32, or None.

    Accepts a pair (q_segment_ids_BT, kv_segment_ids_BS) or a single [B, T] array when T == S.
    """
    if segment_ids is None:
        return None
    if isinstance(segment_ids, (tuple, list)):
        if len(segment_ids) != 2:
            raise ValueError("segment_ids must be a [B, T] array or a pair (q_BT, kv_BS)")
        q_seg_BT, kv_seg_BS = segment_ids
    else:
        if t != s:
            raise ValueError(
                f"a single segment_ids array needs T == S, got T={t}, S={s}; pass a pair "
                "(q_segment_ids_BT, kv_segment_ids_BS)"
            )
        q_seg_BT = kv_seg_BS = segment_ids
    q_seg_BT, kv_seg_BS = jnp.asarray(q_seg_BT), jnp.asarray(kv_seg_BS)
    if q_seg_BT.ndim != 2 or q_seg_BT.shape[1] != t:
        raise ValueError(f"q segment ids have shape {q_seg_BT.shape}, expected [B, T={t}]")
    if kv_seg_BS.ndim != 2 or kv_seg_BS.shape[1] != s:
        raise ValueError(f"kv segment ids have shape {kv_seg_BS.shape}, expected [B, S={s}]")
    return q_seg_BT.astype(jnp.int32), kv_seg_BS.astype(jnp.int32)


def normalize_positions(q_positions: Any, k_positions: Any, t: int, s: int,
                        causal: bool) -> tuple[jax.Array, jax.Array] | None:
    """Returns (q_pos_T, k_pos_S) as int32, or None when both are None. One left None gets
    the default convention's positions (S - T + t for queries, s for keys)."""
    if q_positions is None and k_positions is None:
        return None
    if not causal:
        raise ValueError("q_positions / k_positions only apply to causal attention")
    q_pos_T = (jnp.arange(t, dtype=jnp.int32) + (s - t) if q_positions is None
               else jnp.asarray(q_positions))
    k_pos_S = jnp.arange(s, dtype=jnp.int32) if k_positions is None else jnp.asarray(k_positions)
    for name, x, n in (("q_positions", q_pos_T, t), ("k_positions", k_pos_S, s)):
        if x.shape != (n,):
            raise ValueError(f"{name} has shape {x.shape}, expected [{n}]")
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"{name} must be integers, got {x.dtype}")
    return q_pos_T.astype(jnp.int32), k_pos_S.astype(jnp.int32)


def _mask_BNTS(q_pos_T, k_pos_S, s_len, causal, segs):
    """Visibility mask [B|1, 1, T, S] (None when everything is visible)."""
    mask = None
    if causal:
        mask = (k_pos_S[None, :] <= q_pos_T[:, None])[None, None]
    if s_len is not None:
        valid = (k_pos_S < s_len)[None, None, None, :]
        mask = valid if mask is None else mask & valid
    if segs is not None:
        q_seg_BT, kv_seg_BS = segs
        same = (q_seg_BT[:, :, None] == kv_seg_BS[:, None, :])[:, None]
        mask = same if mask is None else mask & same
    return mask


def _scores_BNTS(q_nope_BTNH, q_pe_BTNR, k_nope_BSNH, k_pe_BSR, sm_scale):
    s_BNTS = jnp.einsum("BTNH,BSNH->BNTS", q_nope_BTNH, k_nope_BSNH,
                        preferred_element_type=jnp.float32)
    s_BNTS += jnp.einsum("BTNR,BSR->BNTS", q_pe_BTNR, k_pe_BSR,
                         preferred_element_type=jnp.float32)
    return s_BNTS * sm_scale


def mla_attention_naive(q_nope_BTNH: jax.Array, q_pe_BTNR: jax.Array, k_nope_BSNH: jax.Array,
                        k_pe_BSR: jax.Array, v_BSNV: jax.Array, *, sm_scale: float,
                        causal: bool = True, segment_ids: Any = None, q_positions: Any = None,
                        k_positions: Any = None) -> jax.Array:
    """Dense oracle for tests: materialises the [B, N, T, S] scores, all math in f32."""
    t, s = q_nope_BTNH.shape[1], k_nope_BSNH.shape[1]
    segs = normalize_segment_ids(segment_ids, t, s)
    q_pos_T, k_pos_S = normalize_positions(q_positions, k_positions, t, s, causal) or (
        jnp.arange(t) + s - t, jnp.arange(s))
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    s_BNTS = _scores_BNTS(f32(q_nope_BTNH), f32(q_pe_BTNR), f32(k_nope_BSNH), f32(k_pe_BSR),
                          sm_scale)
    mask = _mask_BNTS(q_pos_T, k_pos_S, None, causal, segs)
    if mask is not None:
        s_BNTS = jnp.where(mask, s_BNTS, -jnp.inf)
    m_BNT1 = jnp.max(s_BNTS, axis=-1, keepdims=True)
    p_BNTS = jnp.exp(s_BNTS - jnp.where(jnp.isfinite(m_BNT1), m_BNT1, 0.0))
    l_BNT1 = jnp.sum(p_BNTS, axis=-1, keepdims=True)
    p_BNTS = p_BNTS / jnp.where(l_BNT1 == 0.0, 1.0, l_BNT1)
    out_BTNV = jnp.einsum("BNTS,BSNV->BTNV", p_BNTS, f32(v_BSNV))
    return out_BTNV.astype(q_nope_BTNH.dtype)


def _chunk(x_BS, block_kv, s_pad):
    """[B, S, ...] -> [O, B, block_kv, ...] zero-padded to s_pad, for lax.scan over key chunks."""
    b, s = x_BS.shape[:2]
    x_BS = jnp.pad(x_BS, [(0, 0), (0, s_pad - s)] + [(0, 0)] * (x_BS.ndim - 2))
    return jnp.moveaxis(x_BS.reshape(b, s_pad // block_kv, block_kv, *x_BS.shape[2:]), 1, 0)


def _unchunk(x_OBS, s):
    x_BOS = jnp.moveaxis(x_OBS, 0, 1)
    return x_BOS.reshape(x_BOS.shape[0], -1, *x_BOS.shape[3:])[:, :s]


def _chunks(q_nope_BTNH, k_nope_BSNH, k_pe_BSR, v_BSNV, segs, pos, block_kv):
    """(the key chunks to scan, the queries' positions, the key count to mask past or None).
    pos: None, or (q_pos_T, k_pos_S); padded keys then get a position no query reaches."""
    t, s = q_nope_BTNH.shape[1], k_nope_BSNH.shape[1]
    block_kv = min(block_kv, s)
    s_pad = -(-s // block_kv) * block_kv
    if pos is None:
        k_pos = jnp.arange(s_pad, dtype=jnp.int32)
    else:
        k_pos = jnp.pad(pos[1], (0, s_pad - s), constant_values=jnp.iinfo(jnp.int32).max)
    xs = dict(
        k_nope=_chunk(k_nope_BSNH, block_kv, s_pad), k_pe=_chunk(k_pe_BSR, block_kv, s_pad),
        v=_chunk(v_BSNV, block_kv, s_pad),
        k_pos=k_pos.reshape(s_pad // block_kv, block_kv),
    )
    if segs is not None:
        xs["kv_seg"] = _chunk(segs[1], block_kv, s_pad)
    if pos is not None:
        return xs, pos[0], None
    q_pos_T = jnp.arange(t, dtype=jnp.int32) + (s - t)
    return xs, q_pos_T, (s if s_pad != s else None)


def _chunk_mask(x, q_pos_T, s_len, causal, segs):
    chunk_segs = None if segs is None else (segs[0], x["kv_seg"])
    return _mask_BNTS(q_pos_T, x["k_pos"], s_len, causal, chunk_segs)


def _forward(q_nope_BTNH, q_pe_BTNR, k_nope_BSNH, k_pe_BSR, v_BSNV, segs, pos, sm_scale,
             causal, block_kv):
    b, t, n, _ = q_nope_BTNH.shape
    xs, q_pos_T, s_len = _chunks(q_nope_BTNH, k_nope_BSNH, k_pe_BSR, v_BSNV, segs, pos,
                                 block_kv)

    def step(carry, x):
        acc_BNTV, m_BNT1, l_BNT1 = carry
        s_BNTS = _scores_BNTS(q_nope_BTNH, q_pe_BTNR, x["k_nope"], x["k_pe"], sm_scale)
        mask = _chunk_mask(x, q_pos_T, s_len, causal, segs)
        if mask is not None:
            s_BNTS = jnp.where(mask, s_BNTS, -jnp.inf)
        m_new, alpha, p_BNTS, l_BNT1 = online_softmax_step(m_BNT1, l_BNT1, s_BNTS)
        acc_BNTV = alpha * acc_BNTV + jnp.einsum(
            "BNTS,BSNV->BNTV", p_BNTS.astype(v_BSNV.dtype), x["v"],
            preferred_element_type=jnp.float32)
        return (acc_BNTV, m_new, l_BNT1), None

    init = (jnp.zeros((b, n, t, v_BSNV.shape[-1]), jnp.float32),
            jnp.full((b, n, t, 1), -jnp.inf, jnp.float32), jnp.zeros((b, n, t, 1), jnp.float32))
    (acc_BNTV, m_BNT1, l_BNT1), _ = lax.scan(step, init, xs)
    empty = l_BNT1 == 0.0
    out_BNTV = acc_BNTV / jnp.where(empty, 1.0, l_BNT1)
    # +inf for rows that see nothing makes exp(s - lse) vanish in the backward pass.
    lse_BNT1 = jnp.where(empty, jnp.inf, m_BNT1 + jnp.log(jnp.where(empty, 1.0, l_BNT1)))
    out_BTNV = jnp.einsum("BNTV->BTNV", out_BNTV).astype(q_nope_BTNH.dtype)
    return out_BTNV, lse_BNT1


def _backward(q_nope_BTNH, q_pe_BTNR, k_nope_BSNH, k_pe_BSR, v_BSNV, segs, pos, out_BTNV,
              lse_BNT1, do_BTNV, sm_scale, causal, block_kv):
    s = k_nope_BSNH.shape[1]
    xs, q_pos_T, s_len = _chunks(q_nope_BTNH, k_nope_BSNH, k_pe_BSR, v_BSNV, segs, pos,
                                 block_kv)
    delta_BNT1 = jnp.einsum("BTNV,BTNV->BNT", out_BTNV.astype(jnp.float32),
                            do_BTNV.astype(jnp.float32))[..., None]
    dt = q_nope_BTNH.dtype

    def step(carry, x):
        dq_nope_BTNH, dq_pe_BNTR = carry
        s_BNTS = _scores_BNTS(q_nope_BTNH, q_pe_BTNR, x["k_nope"], x["k_pe"], sm_scale)
        mask = _chunk_mask(x, q_pos_T, s_len, causal, segs)
        if mask is not None:
            s_BNTS = jnp.where(mask, s_BNTS, -jnp.inf)
        p_BNTS = jnp.exp(s_BNTS - lse_BNT1)
        dp_BNTS = jnp.einsum("BTNV,BSNV->BNTS", do_BTNV, x["v"],
                             preferred_element_type=jnp.float32)
        ds_BNTS = (p_BNTS * (dp_BNTS - delta_BNT1) * sm_scale).astype(dt)
        f32 = dict(preferred_element_type=jnp.float32)
        dv_BSNV = jnp.einsum("BNTS,BTNV->BSNV", p_BNTS.astype(do_BTNV.dtype), do_BTNV, **f32)
        dk_nope_BSNH = jnp.einsum("BNTS,BTNH->BSNH", ds_BNTS, q_nope_BTNH, **f32)
        dk_pe_BSR = jnp.einsum("BNTS,BTNR->BSR", ds_BNTS, q_pe_BTNR, **f32)
        dq_nope_BTNH += jnp.einsum("BNTS,BSNH->BTNH", ds_BNTS, x["k_nope"], **f32)
        # BNTR, not BTNR: XLA:CPU cannot run the latter as a bf16 x bf16 -> f32 dot.
        dq_pe_BNTR += jnp.einsum("BNTS,BSR->BNTR", ds_BNTS, x["k_pe"], **f32)
        return (dq_nope_BTNH, dq_pe_BNTR), (dk_nope_BSNH, dk_pe_BSR, dv_BSNV)

    b, t, n, r = q_pe_BTNR.shape
    init = (jnp.zeros(q_nope_BTNH.shape, jnp.float32), jnp.zeros((b, n, t, r), jnp.float32))
    (dq_nope_BTNH, dq_pe_BNTR), (dk_nope, dk_pe, dv) = lax.scan(step, init, xs)
    dq_pe_BTNR = jnp.einsum("BNTR->BTNR", dq_pe_BNTR)
    return (dq_nope_BTNH.astype(dt), dq_pe_BTNR.astype(q_pe_BTNR.dtype),
            _unchunk(dk_nope, s).astype(k_nope_BSNH.dtype),
            _unchunk(dk_pe, s).astype(k_pe_BSR.dtype), _unchunk(dv, s).astype(v_BSNV.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _reference(q_nope_BTNH, q_pe_BTNR, k_nope_BSNH, k_pe_BSR, v_BSNV, segs, pos, sm_scale,
               causal, block_kv):
    return _forward(q_nope_BTNH, q_pe_BTNR, k_nope_BSNH, k_pe_BSR, v_BSNV, segs, pos, sm_scale,
                    causal, block_kv)[0]


def _reference_fwd(q_nope_BTNH, q_pe_BTNR, k_nope_BSNH, k_pe_BSR, v_BSNV, segs, pos, sm_scale,
                   causal, block_kv):
    out_BTNV, lse_BNT1 = _forward(q_nope_BTNH, q_pe_BTNR, k_nope_BSNH, k_pe_BSR, v_BSNV, segs,
                                  pos, sm_scale, causal, block_kv)
    res = (q_nope_BTNH, q_pe_BTNR, k_nope_BSNH, k_pe_BSR, v_BSNV, segs, pos, out_BTNV, lse_BNT1)
    return out_BTNV, res


def _reference_bwd(sm_scale, causal, block_kv, res, do_BTNV):
    *inputs, segs, pos, out_BTNV, lse_BNT1 = res
    grads = _backward(*inputs, segs, pos, out_BTNV, lse_BNT1, do_BTNV, sm_scale, causal,
                      block_kv)
    return (*grads, None, None)


_reference.defvjp(_reference_fwd, _reference_bwd)


def mla_attention_reference(q_nope_BTNH: jax.Array, q_pe_BTNR: jax.Array,
                            k_nope_BSNH: jax.Array, k_pe_BSR: jax.Array, v_BSNV: jax.Array, *,
                            sm_scale: float, causal: bool = True, segment_ids: Any = None,
                            block_kv: int = DEFAULT_BLOCK_KV, q_positions: Any = None,
                            k_positions: Any = None) -> jax.Array:
    """Chunked XLA MLA attention: online softmax over key chunks of `block_kv` with lax.scan.

    Never materialises [B, N, T, S]: the forward pass keeps [B, N, T, V] accumulators and one
    [B, N, T, block_kv] score chunk; the backward pass (custom_vjp) recomputes each chunk's
    probabilities from the saved log-sum-exp, FlashAttention-2 style. Same conventions as the
    kernel (see module docstring), positions included. Returns out_BTNV in q's dtype.
    """
    t, s = q_nope_BTNH.shape[1], k_nope_BSNH.shape[1]
    segs = normalize_segment_ids(segment_ids, t, s)
    pos = normalize_positions(q_positions, k_positions, t, s, causal)
    return _reference(q_nope_BTNH, q_pe_BTNR, k_nope_BSNH, k_pe_BSR, v_BSNV, segs, pos,
                      float(sm_scale), bool(causal), int(block_kv))
