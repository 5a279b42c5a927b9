"""Kernel bodies of the MLA flash attention (forward, dq, dk/dv): the portable family (GPU via
Triton, and Pallas' generic interpreter), plus the masking and causal block ranges that the
TPU kernels (`mla_attention_tpu.py`) share.

Legend: B batch, T query len, S key len (inside a kernel body: one query / key block), N heads,
H qk nope head dim, R rope dim, V value dim.
Inside a kernel every ref is 2-D (rows, dim) whatever the HBM layout; `mla_attention.py`
builds the grid and BlockSpecs. Only portable Pallas is used: ref slicing with `pl.ds`,
`lax.dot_general` with f32 accumulation, `lax.fori_loop` with data-independent bounds derived
from `pl.program_id`, elementwise jnp. No scratch, no semaphores, no backend primitives.

Masking uses -inf scores plus a "safe max" (0 when the running max is still -inf), so a row
that sees no key ends with l == 0: its output is written as 0 and its lse as +inf, which makes
exp(s - lse) == 0 for it in the backward kernels (no NaN anywhere).

Causal masking comes in two forms. By default query t sits at position offset + t and key s at
s, so a block's mask is an iota comparison and the visible key blocks of a query block form
static-shaped ranges (`causal_kv_range`, `causal_q_range`). With explicit positions
(`Geometry.has_positions`, e.g. the zigzag layout of context parallelism) each query and key
carries its global position as an int32 tile beside it, the mask is k_pos <= q_pos, and a pair
of blocks is skipped when every key of one is after every query of the other: the portable
kernels test that per block from the position tiles, the TPU kernels from per-block bounds
computed once outside (`block_bounds`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.dispatch import kernel_dot

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b
_NN = (((1,), (0,)), ((), ()))  # a @ b


def _dot(a, b, dims):
    return kernel_dot(a, b, dims)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Static facts a kernel needs beyond its tiles.

    offset: S - T; query t sits at absolute position offset + t (causal convention).
    mask_kv_len: S was padded and nothing else hides the pad (non-causal): mask keys >= s_len.
    has_positions: queries and keys come with their positions (int32 refs after the segment
      ids: q_pos [T, 1], k_pos [1, S]); the causal mask is k_pos <= q_pos, `offset` unused.
    """

    sm_scale: float
    causal: bool
    offset: int
    s_len: int
    mask_kv_len: bool
    has_segments: bool
    has_positions: bool = False


def _mask(g: Geometry, q_start, k_start, shape, q_seg_T1, kv_seg_1S, causal_mask: bool,
          pos=None):
    """The block's visibility mask (None: all visible); `pos` = (q_pos_T1, k_pos_1S) when
    `g.has_positions`."""
    mask = None
    if causal_mask and g.has_positions:
        q_pos_T1, k_pos_1S = pos
        mask = jnp.broadcast_to(k_pos_1S <= q_pos_T1, shape)
    elif causal_mask:
        row = lax.broadcasted_iota(jnp.int32, shape, 0) + (q_start + g.offset)
        col = lax.broadcasted_iota(jnp.int32, shape, 1) + k_start
        mask = col <= row
    if g.mask_kv_len:
        valid = lax.broadcasted_iota(jnp.int32, shape, 1) + k_start < g.s_len
        mask = valid if mask is None else jnp.logical_and(mask, valid)
    if g.has_segments:
        same = q_seg_T1 == kv_seg_1S
        mask = same if mask is None else jnp.logical_and(mask, same)
    return mask


def _scores(g: Geometry, q_nope_TH, q_pe_TR, k_nope_SH, k_pe_SR):
    return (_dot(q_nope_TH, k_nope_SH, _NT) + _dot(q_pe_TR, k_pe_SR, _NT)) * g.sm_scale


def _split_refs(refs, has_segments):
    if has_segments:
        return refs[0], refs[1], refs[2:]
    return None, None, refs


def _split_positions(refs, g: Geometry):
    """(q_pos_ref [T, 1], k_pos_ref [1, S], the rest) when `g.has_positions`."""
    return _split_refs(refs, g.has_positions)


# Positions of padded rows: a padded query sees no key, a padded key is seen by no query.
PAD_Q_POSITION = int(jnp.iinfo(jnp.int32).min)
PAD_K_POSITION = int(jnp.iinfo(jnp.int32).max)


def block_bounds(q_pos_T: jax.Array, k_pos_S: jax.Array, block_q: int, block_kv: int,
                 key_major: bool) -> tuple[jax.Array, ...]:
    """Per-block facts the TPU kernels read from SMEM (scalar prefetch) under explicit
    positions: (q_min, q_max [T / block_q], k_min, k_max [S / block_kv], first, last).

    Key block j is skipped for query block i when k_min[j] > q_max[i] (every key after every
    query) and needs no mask when k_max[j] <= q_min[i]. first / last bound, per query block
    (per key block when `key_major`), the blocks of the other side with any visible pair:
    the kernels fetch only blocks in [first, last] (a block outside is replaced by the nearest
    one, whose DMA the pipeline then skips). Exact for sorted positions; any positions stay
    correct, since the per-pair test decides what is computed."""
    q_QT = q_pos_T.reshape(-1, block_q)
    k_KS = k_pos_S.reshape(-1, block_kv)
    q_min, q_max = jnp.min(q_QT, axis=1), jnp.max(q_QT, axis=1)
    k_min, k_max = jnp.min(k_KS, axis=1), jnp.max(k_KS, axis=1)
    visible_QK = k_min[None, :] <= q_max[:, None]
    if key_major:
        visible_QK = visible_QK.T
    n = visible_QK.shape[1]
    seen = jnp.any(visible_QK, axis=1)
    first = jnp.where(seen, jnp.argmax(visible_QK, axis=1), 0)
    last = jnp.where(seen, n - 1 - jnp.argmax(visible_QK[:, ::-1], axis=1), 0)
    return tuple(x.astype(jnp.int32) for x in (q_min, q_max, k_min, k_max, first, last))


def causal_kv_range(g: Geometry, i: jax.Array, block_q: int, block_kv: int,
                    num_kv: int) -> tuple[jax.Array, jax.Array]:
    """Key blocks for query block i: [0, n_full) see no causal mask, [n_full, hi) need it."""
    # Only non-negative operands reach lax.div, whose rounding is towards zero.
    hi = lax.div(jnp.maximum(g.offset + (i + 1) * block_q, 0) + block_kv - 1, block_kv)
    hi = jnp.minimum(hi, num_kv)
    n_full = jnp.minimum(lax.div(jnp.maximum(g.offset + i * block_q + 1, 0), block_kv), hi)
    return n_full, hi


def causal_q_range(g: Geometry, j: jax.Array, block_q: int, block_kv: int,
                   num_q: int) -> tuple[jax.Array, jax.Array]:
    """Query blocks for key block j: [lo, mid) need the causal mask, [mid, num_q) do not."""
    lo = jnp.minimum(lax.div(jnp.maximum(j * block_kv - g.offset, 0), block_q), num_q)
    last_key = (j + 1) * block_kv - 1 - g.offset
    mid = lax.div(jnp.maximum(last_key, 0) + block_q - 1, block_q)
    mid = jnp.clip(mid, lo, num_q)
    return lo, mid


def _loop(body, start, stop, causal_mask: bool, carry):
    return lax.fori_loop(start, stop, functools.partial(body, causal_mask=causal_mask), carry)


def _visible_only(body, visible):
    """`body` (masked) where `visible(j)`, else the carry unchanged."""

    def step(j, carry):
        return lax.cond(visible(j), lambda c: body(j, c, causal_mask=True), lambda c: c, carry)

    return step


def _over_kv_blocks(body, g: Geometry, i, block_q: int, block_kv: int, num_kv: int, carry,
                    visible=None):
    """`body` over the key blocks query block i sees: unmasked over the blocks wholly below
    the diagonal, masked over the ones it crosses (all blocks unmasked when not causal).
    With positions, masked over every key block for which `visible(j)` holds."""
    if not g.causal:
        return _loop(body, 0, num_kv, False, carry)
    if g.has_positions:
        return lax.fori_loop(0, num_kv, _visible_only(body, visible), carry)
    n_full, hi = causal_kv_range(g, i, block_q, block_kv, num_kv)
    return _loop(body, n_full, hi, True, _loop(body, 0, n_full, False, carry))


def _kv_block_visible(q_pos_T1, k_pos_ref, block_kv: int):
    """With positions: j -> whether key block j holds a key at or before the query block's
    last position (None without positions)."""
    if q_pos_T1 is None:
        return None
    q_max = jnp.max(q_pos_T1)

    def visible(j):
        return jnp.min(k_pos_ref[:, pl.ds(pl.multiple_of(j * block_kv, block_kv),
                                          block_kv)]) <= q_max

    return visible


def forward_kernel(*refs: Any, g: Geometry, block_q: int, block_kv: int,
                   block_axis: int) -> None:
    """One (b, n, query block): online softmax over key blocks of the VMEM/L2-resident K/V."""
    q_seg_ref, kv_seg_ref, refs = _split_refs(refs, g.has_segments)
    q_pos_ref, k_pos_ref, refs = _split_positions(refs, g)
    q_nope_ref, q_pe_ref, k_nope_ref, k_pe_ref, v_ref, out_ref, lse_ref = refs
    i = pl.program_id(block_axis)
    q_nope_TH, q_pe_TR = q_nope_ref[...], q_pe_ref[...]
    q_seg_T1 = q_seg_ref[...] if g.has_segments else None
    q_pos_T1 = q_pos_ref[...] if g.has_positions else None
    visible = _kv_block_visible(q_pos_T1, k_pos_ref, block_kv)
    num_kv = k_nope_ref.shape[0] // block_kv

    def body(j, carry, causal_mask):
        acc_TV, m_T1, l_T1 = carry
        ks = pl.ds(pl.multiple_of(j * block_kv, block_kv), block_kv)
        s_TS = _scores(g, q_nope_TH, q_pe_TR, k_nope_ref[ks, :], k_pe_ref[ks, :])
        kv_seg_1S = kv_seg_ref[:, ks] if g.has_segments else None
        pos = (q_pos_T1, k_pos_ref[:, ks]) if g.has_positions else None
        mask = _mask(g, i * block_q, j * block_kv, s_TS.shape, q_seg_T1, kv_seg_1S,
                     causal_mask, pos)
        if mask is not None:
            s_TS = jnp.where(mask, s_TS, -jnp.inf)
        m_new = jnp.maximum(m_T1, jnp.max(s_TS, axis=1, keepdims=True))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha_T1 = jnp.exp(m_T1 - m_safe)
        p_TS = jnp.exp(s_TS - m_safe)
        l_T1 = alpha_T1 * l_T1 + jnp.sum(p_TS, axis=1, keepdims=True)
        v_SV = v_ref[ks, :]
        acc_TV = alpha_T1 * acc_TV + _dot(p_TS.astype(v_SV.dtype), v_SV, _NN)
        return acc_TV, m_new, l_T1

    rows = q_nope_TH.shape[0]
    carry = (jnp.zeros((rows, v_ref.shape[1]), jnp.float32),
             jnp.full((rows, 1), -jnp.inf, jnp.float32), jnp.zeros((rows, 1), jnp.float32))
    carry = _over_kv_blocks(body, g, i, block_q, block_kv, num_kv, carry, visible)
    acc_TV, m_T1, l_T1 = carry
    empty = l_T1 == 0.0
    l_safe = jnp.where(empty, 1.0, l_T1)
    out_ref[...] = (acc_TV / l_safe).astype(out_ref.dtype)
    lse_ref[...] = jnp.where(empty, jnp.inf, m_T1 + jnp.log(l_safe))


def dq_kernel(*refs: Any, g: Geometry, block_q: int, block_kv: int, block_axis: int) -> None:
    """One (b, n, query block): dq_nope, dq_pe by a loop over key blocks."""
    q_seg_ref, kv_seg_ref, refs = _split_refs(refs, g.has_segments)
    q_pos_ref, k_pos_ref, refs = _split_positions(refs, g)
    (q_nope_ref, q_pe_ref, k_nope_ref, k_pe_ref, v_ref, do_ref, lse_ref, delta_ref,
     dq_nope_ref, dq_pe_ref) = refs
    i = pl.program_id(block_axis)
    q_nope_TH, q_pe_TR, do_TV = q_nope_ref[...], q_pe_ref[...], do_ref[...]
    lse_T1, delta_T1 = lse_ref[...], delta_ref[...]
    q_seg_T1 = q_seg_ref[...] if g.has_segments else None
    q_pos_T1 = q_pos_ref[...] if g.has_positions else None
    visible = _kv_block_visible(q_pos_T1, k_pos_ref, block_kv)
    num_kv = k_nope_ref.shape[0] // block_kv

    def body(j, carry, causal_mask):
        dq_nope_TH, dq_pe_TR = carry
        ks = pl.ds(pl.multiple_of(j * block_kv, block_kv), block_kv)
        k_nope_SH, k_pe_SR = k_nope_ref[ks, :], k_pe_ref[ks, :]
        s_TS = _scores(g, q_nope_TH, q_pe_TR, k_nope_SH, k_pe_SR)
        kv_seg_1S = kv_seg_ref[:, ks] if g.has_segments else None
        pos = (q_pos_T1, k_pos_ref[:, ks]) if g.has_positions else None
        mask = _mask(g, i * block_q, j * block_kv, s_TS.shape, q_seg_T1, kv_seg_1S,
                     causal_mask, pos)
        if mask is not None:
            s_TS = jnp.where(mask, s_TS, -jnp.inf)
        p_TS = jnp.exp(s_TS - lse_T1)
        dp_TS = _dot(do_TV, v_ref[ks, :], _NT)
        ds_TS = (p_TS * (dp_TS - delta_T1)).astype(k_nope_SH.dtype)
        return (dq_nope_TH + _dot(ds_TS, k_nope_SH, _NN), dq_pe_TR + _dot(ds_TS, k_pe_SR, _NN))

    carry = (jnp.zeros(q_nope_TH.shape, jnp.float32), jnp.zeros(q_pe_TR.shape, jnp.float32))
    carry = _over_kv_blocks(body, g, i, block_q, block_kv, num_kv, carry, visible)
    dq_nope_TH, dq_pe_TR = carry
    dq_nope_ref[...] = (dq_nope_TH * g.sm_scale).astype(dq_nope_ref.dtype)
    dq_pe_ref[...] = (dq_pe_TR * g.sm_scale).astype(dq_pe_ref.dtype)


def dkv_kernel(*refs: Any, g: Geometry, block_q: int, block_kv: int, block_axis: int) -> None:
    """One (b, n, key block): dk_nope, dv and this head's share of dk_pe, looping over queries.

    dk_pe belongs to all heads; each head writes its own f32 partial and the caller sums the
    partials over N (a Triton grid has no ordered cross-program accumulation).
    """
    q_seg_ref, kv_seg_ref, refs = _split_refs(refs, g.has_segments)
    q_pos_ref, k_pos_ref, refs = _split_positions(refs, g)
    (q_nope_ref, q_pe_ref, k_nope_ref, k_pe_ref, v_ref, do_ref, lse_ref, delta_ref,
     dk_nope_ref, dk_pe_ref, dv_ref) = refs
    j = pl.program_id(block_axis)
    k_nope_SH, k_pe_SR, v_SV = k_nope_ref[...], k_pe_ref[...], v_ref[...]
    kv_seg_1S = kv_seg_ref[...] if g.has_segments else None
    k_pos_1S = k_pos_ref[...] if g.has_positions else None
    num_q = q_nope_ref.shape[0] // block_q

    def body(i, carry, causal_mask):
        dk_nope_SH, dk_pe_SR, dv_SV = carry
        qs = pl.ds(pl.multiple_of(i * block_q, block_q), block_q)
        q_nope_TH, q_pe_TR, do_TV = q_nope_ref[qs, :], q_pe_ref[qs, :], do_ref[qs, :]
        s_TS = _scores(g, q_nope_TH, q_pe_TR, k_nope_SH, k_pe_SR)
        q_seg_T1 = q_seg_ref[qs, :] if g.has_segments else None
        pos = (q_pos_ref[qs, :], k_pos_1S) if g.has_positions else None
        mask = _mask(g, i * block_q, j * block_kv, s_TS.shape, q_seg_T1, kv_seg_1S,
                     causal_mask, pos)
        if mask is not None:
            s_TS = jnp.where(mask, s_TS, -jnp.inf)
        p_TS = jnp.exp(s_TS - lse_ref[qs, :])
        dv_SV = dv_SV + _dot(p_TS.astype(do_TV.dtype), do_TV, _TN)
        dp_TS = _dot(do_TV, v_SV, _NT)
        ds_TS = (p_TS * (dp_TS - delta_ref[qs, :])).astype(q_nope_TH.dtype)
        return (dk_nope_SH + _dot(ds_TS, q_nope_TH, _TN), dk_pe_SR + _dot(ds_TS, q_pe_TR, _TN),
                dv_SV)

    carry = (jnp.zeros(k_nope_SH.shape, jnp.float32), jnp.zeros(k_pe_SR.shape, jnp.float32),
             jnp.zeros(v_SV.shape, jnp.float32))
    if g.causal and g.has_positions:
        k_min = jnp.min(k_pos_1S)

        def visible(i):  # some query of block i at or after the block's first key
            return jnp.max(q_pos_ref[pl.ds(pl.multiple_of(i * block_q, block_q), block_q),
                                     :]) >= k_min

        carry = lax.fori_loop(0, num_q, _visible_only(body, visible), carry)
    elif g.causal:
        lo, mid = causal_q_range(g, j, block_q, block_kv, num_q)
        carry = _loop(body, lo, mid, True, carry)
        carry = _loop(body, mid, num_q, False, carry)
    else:
        carry = _loop(body, 0, num_q, False, carry)
    dk_nope_SH, dk_pe_SR, dv_SV = carry
    dk_nope_ref[...] = (dk_nope_SH * g.sm_scale).astype(dk_nope_ref.dtype)
    dk_pe_ref[...] = dk_pe_SR * g.sm_scale
    dv_ref[...] = dv_SV.astype(dv_ref.dtype)
