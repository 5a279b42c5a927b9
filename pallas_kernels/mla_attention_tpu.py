"""MLA flash attention on TPU (Mosaic): forward, dq and dk/dv kernels that stream K/V.

Legend: B batch, T query len, S key len (inside a kernel body: one query / key block), N heads,
H qk nope head dim, R rope dim, V value dim.
Operands are head-major: q_nope [B, N, T, H], q_pe [B, N, T, R], k_nope [B, N, S, H],
v [B, N, S, V]; the rope key k_pe [B, S, R] is one row per token shared by every head (never
broadcast over N).

Each kernel walks the other sequence block by block along its innermost grid axis, as jax's
TPU flash and splash kernels do: Pallas double-buffers one block of each operand into VMEM
while the previous one is used, and the running statistics and accumulators live in VMEM
scratch across those grid steps. VMEM use therefore depends on the block sizes only, never on
T or S.

  forward  grid (B, N, T/bq, S/bk)   scratch m, l [bq, 1], acc [bq, V]
  dq       grid (B, N, T/bq, S/bk)   scratch dq_nope [bq, H], dq_pe [bq, R]
  dk/dv    grid (B, S/bk, N, T/bq)   scratch dk_nope [bk, H], dv [bk, V], dk_pe [bk, R]

dk/dv runs the heads inside each key block, so the shared rope key's gradient is summed over
heads in VMEM and written once per key block ([B, S, R]; no per-head partials in HBM).

Causal blocks with nothing visible are skipped (`pl.when`), and their index maps repeat the
last (or first) block that is needed, so the pipeline issues no DMA for them either.

With explicit positions (`Geometry.has_positions`) the six per-block bounds of
`mla_attention_kernels.block_bounds` come first, as scalar prefetch (SMEM): the `pl.when`
tests and the index maps read them instead of the block arithmetic of the default layout, and
the position tiles q_pos [bq, 1] / k_pos [1, bk] follow the segment ids.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.dispatch import online_softmax_step
from pallas_kernels.mla_attention_kernels import (
    _NN,
    _NT,
    _TN,
    Geometry,
    _dot,
    _mask,
    _scores,
    _split_positions,
    _split_refs,
    block_bounds,
    causal_kv_range,
    causal_q_range,
)

NUM_BOUNDS = 6  # block_bounds: q_min, q_max, k_min, k_max, first, last


def _kernel_refs(refs, g: Geometry):
    """(the block bounds' SMEM refs or None, q_seg_ref, kv_seg_ref, q_pos_ref, k_pos_ref,
    the operand refs)."""
    bounds = refs[:NUM_BOUNDS] if g.has_positions else None
    refs = refs[NUM_BOUNDS:] if g.has_positions else refs
    q_seg_ref, kv_seg_ref, refs = _split_refs(refs, g.has_segments)
    q_pos_ref, k_pos_ref, refs = _split_positions(refs, g)
    return bounds, q_seg_ref, kv_seg_ref, q_pos_ref, k_pos_ref, refs


def _fetch(bounds, row, other):
    """Under positions: block `other`, clamped to the blocks that block `row` needs."""
    first, last = bounds[4], bounds[5]
    return jnp.minimum(jnp.maximum(other, first[row]), last[row])


def _kv_block(g: Geometry, i, j, *bounds, block_q: int, block_kv: int, num_kv: int):
    """The key block to fetch at grid step (i, j): j, or the last visible one past it."""
    if not g.causal:
        return j
    if g.has_positions:
        return _fetch(bounds, i, j)
    _, hi = causal_kv_range(g, i, block_q, block_kv, num_kv)
    return jnp.maximum(jnp.minimum(j, hi - 1), 0)


def _q_block(g: Geometry, j, i, *bounds, block_q: int, block_kv: int, num_q: int):
    """The query block to fetch at grid step (j, i): i, or the first that sees key block j."""
    if not g.causal:
        return i
    if g.has_positions:
        return _fetch(bounds, j, i)
    lo, _ = causal_q_range(g, j, block_q, block_kv, num_q)
    return jnp.minimum(jnp.maximum(i, lo), num_q - 1)


def _masked_scores(g, q_nope_TH, q_pe_TR, k_nope_SH, k_pe_SR, q_start, k_start, q_seg, kv_seg,
                   causal_mask, pos=None):
    s_TS = _scores(g, q_nope_TH, q_pe_TR, k_nope_SH, k_pe_SR)
    mask = _mask(g, q_start, k_start, s_TS.shape, q_seg, kv_seg, causal_mask, pos)
    return s_TS if mask is None else jnp.where(mask, s_TS, -jnp.inf)


def _probs_and_dscores(g, refs, q_start, k_start, causal_mask):
    """Backward: the recomputed probabilities p and the score gradient ds (before sm_scale)
    of one (query block, key block) pair; `refs` holds the blocks' refs by name."""
    q_nope_TH = refs["q_nope"][...]
    s_TS = _masked_scores(
        g, q_nope_TH, refs["q_pe"][...], refs["k_nope"][...], refs["k_pe"][...], q_start,
        k_start, refs["q_seg"][...] if g.has_segments else None,
        refs["kv_seg"][...] if g.has_segments else None, causal_mask,
        (refs["q_pos"][...], refs["k_pos"][...]) if g.has_positions else None)
    p_TS = jnp.exp(s_TS - refs["lse"][...])
    dp_TS = _dot(refs["do"][...], refs["v"][...], _NT)
    ds_TS = (p_TS * (dp_TS - refs["delta"][...])).astype(q_nope_TH.dtype)
    return p_TS, ds_TS


def _backward_refs(q_seg_ref, kv_seg_ref, q_pos_ref, k_pos_ref, refs):
    names = ("q_nope", "q_pe", "k_nope", "k_pe", "v", "do", "lse", "delta")
    return dict(zip(names, refs[:8], strict=True), q_seg=q_seg_ref, kv_seg=kv_seg_ref,
                q_pos=q_pos_ref, k_pos=k_pos_ref)


def _each_kv_block(g: Geometry, i, j, block_q: int, block_kv: int, num_kv: int, run,
                   bounds=None):
    """Query-major kernels: runs `run(causal_mask)` for key block j of query block i, without
    the mask where every pair is visible and with it where only some are; nothing where none
    is."""
    if not g.causal:
        run(False)
        return
    if g.has_positions:
        _each_visible_pair(bounds, i, j, run)
        return
    n_full, hi = causal_kv_range(g, i, block_q, block_kv, num_kv)
    pl.when(j < n_full)(lambda: run(False))
    pl.when(jnp.logical_and(j >= n_full, j < hi))(lambda: run(True))


def _each_q_block(g: Geometry, j, i, block_q: int, block_kv: int, num_q: int, run,
                  bounds=None):
    """Key-major kernel: the same for query block i of key block j."""
    if not g.causal:
        run(False)
        return
    if g.has_positions:
        _each_visible_pair(bounds, i, j, run)
        return
    lo, mid = causal_q_range(g, j, block_q, block_kv, num_q)
    pl.when(i >= mid)(lambda: run(False))
    pl.when(jnp.logical_and(i >= lo, i < mid))(lambda: run(True))


def _each_visible_pair(bounds, i, j, run):
    """Under positions, query block i and key block j: `run(False)` when every key is at or
    before every query, `run(True)` when only some pairs are visible, nothing otherwise."""
    q_min, q_max, k_min, k_max = bounds[:4]
    visible, full = k_min[j] <= q_max[i], k_max[j] <= q_min[i]
    pl.when(full)(lambda: run(False))
    pl.when(jnp.logical_and(visible, jnp.logical_not(full)))(lambda: run(True))


def forward_kernel(*refs: Any, g: Geometry, block_q: int, block_kv: int) -> None:
    """Grid (b, n, query block i, key block j): online softmax over the key blocks into VMEM
    scratch; the last j writes the output block and its log-sum-exp."""
    bounds, q_seg_ref, kv_seg_ref, q_pos_ref, k_pos_ref, refs = _kernel_refs(refs, g)
    (q_nope_ref, q_pe_ref, k_nope_ref, k_pe_ref, v_ref, out_ref, lse_ref,
     m_ref, l_ref, acc_ref) = refs
    i, j, num_kv = pl.program_id(2), pl.program_id(3), pl.num_programs(3)

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def run(causal_mask):
        s_TS = _masked_scores(
            g, q_nope_ref[...], q_pe_ref[...], k_nope_ref[...], k_pe_ref[...], i * block_q,
            j * block_kv, q_seg_ref[...] if g.has_segments else None,
            kv_seg_ref[...] if g.has_segments else None, causal_mask,
            (q_pos_ref[...], k_pos_ref[...]) if g.has_positions else None)
        m_new, alpha_T1, p_TS, l_ref[...] = online_softmax_step(m_ref[...], l_ref[...], s_TS)
        v_SV = v_ref[...]
        acc_ref[...] = alpha_T1 * acc_ref[...] + _dot(p_TS.astype(v_SV.dtype), v_SV, _NN)
        m_ref[...] = m_new

    _each_kv_block(g, i, j, block_q, block_kv, num_kv, run, bounds)

    @pl.when(j == num_kv - 1)
    def _finish():
        l_T1 = l_ref[...]
        empty = l_T1 == 0.0
        l_safe = jnp.where(empty, 1.0, l_T1)
        out_ref[...] = (acc_ref[...] / l_safe).astype(out_ref.dtype)
        lse_ref[...] = jnp.where(empty, jnp.inf, m_ref[...] + jnp.log(l_safe))


def dq_kernel(*refs: Any, g: Geometry, block_q: int, block_kv: int) -> None:
    """Grid (b, n, query block i, key block j): accumulates dq (nope and rope parts) of query
    block i over the key blocks; the last j writes them."""
    bounds, q_seg_ref, kv_seg_ref, q_pos_ref, k_pos_ref, refs = _kernel_refs(refs, g)
    (q_nope_ref, q_pe_ref, k_nope_ref, k_pe_ref, v_ref, do_ref, lse_ref, delta_ref,
     dq_nope_ref, dq_pe_ref, dq_nope_acc, dq_pe_acc) = refs
    i, j, num_kv = pl.program_id(2), pl.program_id(3), pl.num_programs(3)

    @pl.when(j == 0)
    def _init():
        dq_nope_acc[...] = jnp.zeros(dq_nope_acc.shape, jnp.float32)
        dq_pe_acc[...] = jnp.zeros(dq_pe_acc.shape, jnp.float32)

    blocks = _backward_refs(q_seg_ref, kv_seg_ref, q_pos_ref, k_pos_ref, refs)

    def run(causal_mask):
        _, ds_TS = _probs_and_dscores(g, blocks, i * block_q, j * block_kv, causal_mask)
        dq_nope_acc[...] += _dot(ds_TS, k_nope_ref[...], _NN)
        dq_pe_acc[...] += _dot(ds_TS, k_pe_ref[...], _NN)

    _each_kv_block(g, i, j, block_q, block_kv, num_kv, run, bounds)

    @pl.when(j == num_kv - 1)
    def _finish():
        dq_nope_ref[...] = (dq_nope_acc[...] * g.sm_scale).astype(dq_nope_ref.dtype)
        dq_pe_ref[...] = (dq_pe_acc[...] * g.sm_scale).astype(dq_pe_ref.dtype)


def dkv_kernel(*refs: Any, g: Geometry, block_q: int, block_kv: int) -> None:
    """Grid (b, key block j, n, query block i): accumulates dk_nope and dv per head over the
    query blocks, and the shared dk_pe over heads and query blocks."""
    bounds, q_seg_ref, kv_seg_ref, q_pos_ref, k_pos_ref, refs = _kernel_refs(refs, g)
    (q_nope_ref, q_pe_ref, k_nope_ref, k_pe_ref, v_ref, do_ref, lse_ref, delta_ref,
     dk_nope_ref, dk_pe_ref, dv_ref, dk_nope_acc, dv_acc, dk_pe_acc) = refs
    j, n, i = pl.program_id(1), pl.program_id(2), pl.program_id(3)
    num_heads, num_q = pl.num_programs(2), pl.num_programs(3)

    @pl.when(jnp.logical_and(n == 0, i == 0))
    def _init_shared():
        dk_pe_acc[...] = jnp.zeros(dk_pe_acc.shape, jnp.float32)

    @pl.when(i == 0)
    def _init_head():
        dk_nope_acc[...] = jnp.zeros(dk_nope_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    blocks = _backward_refs(q_seg_ref, kv_seg_ref, q_pos_ref, k_pos_ref, refs)

    def run(causal_mask):
        p_TS, ds_TS = _probs_and_dscores(g, blocks, i * block_q, j * block_kv, causal_mask)
        do_TV = do_ref[...]
        dv_acc[...] += _dot(p_TS.astype(do_TV.dtype), do_TV, _TN)
        dk_nope_acc[...] += _dot(ds_TS, q_nope_ref[...], _TN)
        dk_pe_acc[...] += _dot(ds_TS, q_pe_ref[...], _TN)

    _each_q_block(g, j, i, block_q, block_kv, num_q, run, bounds)

    @pl.when(i == num_q - 1)
    def _finish_head():
        dk_nope_ref[...] = (dk_nope_acc[...] * g.sm_scale).astype(dk_nope_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)

    @pl.when(jnp.logical_and(n == num_heads - 1, i == num_q - 1))
    def _finish_shared():
        dk_pe_ref[...] = (dk_pe_acc[...] * g.sm_scale).astype(dk_pe_ref.dtype)


# --- pallas_call builders ---------------------------------------------------------------------
def _spec(shape, index):
    return pl.BlockSpec(shape, index)


def _params(semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics)


def _pallas_call(kernel, bounds, *, grid, in_specs, out_specs, scratch_shapes, **kw):
    """`pl.pallas_call`, with the block bounds (when not None) as scalar prefetch: the
    returned function takes the operands only."""
    if bounds is None:
        return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
                              scratch_shapes=scratch_shapes, **kw)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(bounds), grid=grid, in_specs=in_specs, out_specs=out_specs,
        scratch_shapes=scratch_shapes)
    call = pl.pallas_call(kernel, grid_spec=grid_spec, **kw)
    return lambda *args: call(*bounds, *args)


def _bounds(g: Geometry, pos: Any, bq: int, bk: int, key_major: bool):
    """The scalar-prefetch block bounds under positions (None otherwise)."""
    if not g.has_positions:
        return None
    q_pos_T1, k_pos_1S = pos
    return block_bounds(q_pos_T1[:, 0], k_pos_1S[0], bq, bk, key_major)


def _q_major_specs(g, bq, bk, num_kv, h, r, dv):
    """BlockSpecs of the q-major kernels (forward, dq): grid (b, n, i, j), then the block
    bounds under positions. Returns (q_rows, k_rows, k_pe spec, segment and position specs)."""
    kv = functools.partial(_kv_block, g, block_q=bq, block_kv=bk, num_kv=num_kv)

    def q_rows(d):
        return _spec((None, None, bq, d), lambda b, n, i, j, *_: (b, n, i, 0))

    def k_rows(d):
        return _spec((None, None, bk, d), lambda b, n, i, j, *s: (b, n, kv(i, j, *s), 0))

    extra = []
    if g.has_segments:
        extra += [_spec((None, bq, 1), lambda b, n, i, j, *_: (b, i, 0)),
                  _spec((None, 1, bk), lambda b, n, i, j, *s: (b, 0, kv(i, j, *s)))]
    if g.has_positions:
        extra += [_spec((bq, 1), lambda b, n, i, j, *_: (i, 0)),
                  _spec((1, bk), lambda b, n, i, j, *s: (0, kv(i, j, *s)))]
    k_pe = _spec((None, bk, r), lambda b, n, i, j, *s: (b, kv(i, j, *s), 0))
    return q_rows, k_rows, k_pe, extra


def forward(g: Geometry, bq: int, bk: int, interpret: Any, q_nope: jax.Array, q_pe: jax.Array,
            k_nope: jax.Array, k_pe: jax.Array, v: jax.Array,
            segs: Any, pos: Any = None) -> list[jax.Array]:
    """(out [B, N, T, V], lse [B, N, T, 1] f32). pos: (q_pos [T, 1], k_pos [1, S]) int32 when
    `g.has_positions`."""
    b, n, t, h = q_nope.shape
    s, r, dv = k_nope.shape[2], q_pe.shape[-1], v.shape[-1]
    num_kv = s // bk
    q_rows, k_rows, k_pe_spec, extra = _q_major_specs(g, bq, bk, num_kv, h, r, dv)
    return _pallas_call(
        functools.partial(forward_kernel, g=g, block_q=bq, block_kv=bk),
        _bounds(g, pos, bq, bk, key_major=False),
        grid=(b, n, t // bq, num_kv),
        in_specs=extra + [q_rows(h), q_rows(r), k_rows(h), k_pe_spec, k_rows(dv)],
        out_specs=[q_rows(dv), q_rows(1)],
        out_shape=[jax.ShapeDtypeStruct((b, n, t, dv), q_nope.dtype),
                   jax.ShapeDtypeStruct((b, n, t, 1), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                        pltpu.VMEM((bq, dv), jnp.float32)],
        interpret=interpret, name="mla_attention_fwd",
        compiler_params=_params(("parallel", "parallel", "parallel", "arbitrary")),
    )(*(segs or ()), *(pos or ()), q_nope, q_pe, k_nope, k_pe, v)


def dq(g: Geometry, bq: int, bk: int, interpret: Any, q_nope: jax.Array, q_pe: jax.Array,
       k_nope: jax.Array, k_pe: jax.Array, v: jax.Array, segs: Any, do: jax.Array,
       lse: jax.Array, delta: jax.Array, pos: Any = None) -> list[jax.Array]:
    """(dq_nope [B, N, T, H], dq_pe [B, N, T, R])."""
    b, n, t, h = q_nope.shape
    s, r, dv = k_nope.shape[2], q_pe.shape[-1], v.shape[-1]
    num_kv = s // bk
    q_rows, k_rows, k_pe_spec, extra = _q_major_specs(g, bq, bk, num_kv, h, r, dv)
    return _pallas_call(
        functools.partial(dq_kernel, g=g, block_q=bq, block_kv=bk),
        _bounds(g, pos, bq, bk, key_major=False),
        grid=(b, n, t // bq, num_kv),
        in_specs=extra + [q_rows(h), q_rows(r), k_rows(h), k_pe_spec, k_rows(dv),
                          q_rows(dv), q_rows(1), q_rows(1)],
        out_specs=[q_rows(h), q_rows(r)],
        out_shape=[jax.ShapeDtypeStruct(q_nope.shape, q_nope.dtype),
                   jax.ShapeDtypeStruct(q_pe.shape, q_pe.dtype)],
        scratch_shapes=[pltpu.VMEM((bq, h), jnp.float32), pltpu.VMEM((bq, r), jnp.float32)],
        interpret=interpret, name="mla_attention_dq",
        compiler_params=_params(("parallel", "parallel", "parallel", "arbitrary")),
    )(*(segs or ()), *(pos or ()), q_nope, q_pe, k_nope, k_pe, v, do, lse, delta)


def dkv(g: Geometry, bq: int, bk: int, interpret: Any, q_nope: jax.Array, q_pe: jax.Array,
        k_nope: jax.Array, k_pe: jax.Array, v: jax.Array, segs: Any, do: jax.Array,
        lse: jax.Array, delta: jax.Array, pos: Any = None) -> list[jax.Array]:
    """(dk_nope [B, N, S, H], dk_pe [B, S, R] summed over heads, dv [B, N, S, V])."""
    b, n, t, h = q_nope.shape
    s, r, dv_dim = k_nope.shape[2], q_pe.shape[-1], v.shape[-1]
    num_q = t // bq
    qb = functools.partial(_q_block, g, block_q=bq, block_kv=bk, num_q=num_q)

    def q_rows(d):
        return _spec((None, None, bq, d), lambda b_, j, n_, i, *s: (b_, n_, qb(j, i, *s), 0))

    def k_rows(d):
        return _spec((None, None, bk, d), lambda b_, j, n_, i, *_: (b_, n_, j, 0))

    k_pe_spec = _spec((None, bk, r), lambda b_, j, n_, i, *_: (b_, j, 0))
    extra = []
    if g.has_segments:
        extra += [_spec((None, bq, 1), lambda b_, j, n_, i, *s: (b_, qb(j, i, *s), 0)),
                  _spec((None, 1, bk), lambda b_, j, n_, i, *_: (b_, 0, j))]
    if g.has_positions:
        extra += [_spec((bq, 1), lambda b_, j, n_, i, *s: (qb(j, i, *s), 0)),
                  _spec((1, bk), lambda b_, j, n_, i, *_: (0, j))]
    return _pallas_call(
        functools.partial(dkv_kernel, g=g, block_q=bq, block_kv=bk),
        _bounds(g, pos, bq, bk, key_major=True),
        grid=(b, s // bk, n, num_q),
        in_specs=extra + [q_rows(h), q_rows(r), k_rows(h), k_pe_spec, k_rows(dv_dim),
                          q_rows(dv_dim), q_rows(1), q_rows(1)],
        out_specs=[k_rows(h), k_pe_spec, k_rows(dv_dim)],
        out_shape=[jax.ShapeDtypeStruct(k_nope.shape, k_nope.dtype),
                   jax.ShapeDtypeStruct(k_pe.shape, k_pe.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype)],
        scratch_shapes=[pltpu.VMEM((bk, h), jnp.float32), pltpu.VMEM((bk, dv_dim), jnp.float32),
                        pltpu.VMEM((bk, r), jnp.float32)],
        interpret=interpret, name="mla_attention_dkv",
        # Heads and query blocks accumulate into the same key block: "arbitrary".
        compiler_params=_params(("parallel", "parallel", "arbitrary", "arbitrary")),
    )(*(segs or ()), *(pos or ()), q_nope, q_pe, k_nope, k_pe, v, do, lse, delta)
