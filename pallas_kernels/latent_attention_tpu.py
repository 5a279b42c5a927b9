"""Absorbed-MLA decode on TPU (Mosaic): the latent cache streamed block by block.

Legend: see layers.py (B batch, Y = T * N query rows, C kv latent rank, R rope dim); O the
splits of the cache, S the cache slots of one block.

Grid (B, O, Y / rows, blocks per split): the innermost axis walks split p's cache blocks;
Pallas double-buffers one block of S slots of the latent and rope cache into VMEM at a time,
and the running max, sum and [rows, C] accumulator live in VMEM scratch across those steps.
VMEM use depends on the block sizes alone, not on the cache length S.

The sequence lengths are prefetched into SMEM, so the index maps see them: a block at or
beyond a sequence's length repeats the last valid block's index (the pipeline issues no DMA
for it) and its compute is skipped. A long, mostly empty cache costs only the slots in use.
Each split writes a normalised partial output with its log-sum-exp, merged by the caller.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.dispatch import kernel_dot, online_softmax_step

_NT = (((1,), (1,)), ((), ()))
_NN = (((1,), (0,)), ((), ()))


@dataclasses.dataclass(frozen=True)
class Static:
    """What the decode kernels (TPU and portable) know statically."""

    sm_scale: float
    causal: bool
    t_len: int
    block_kv: int
    blocks_per_split: int
    num_kv: int


def _ceil_div(a, b: int):
    return lax.div(jnp.maximum(a, 0) + b - 1, b)


def _last_block(length, st: Static):
    """Index of the last cache block holding a valid slot (0 for an empty sequence)."""
    return jnp.clip(_ceil_div(length, st.block_kv) - 1, 0, st.num_kv - 1)


def _kernel(lengths_ref, row_t_ref, q_lat_ref, q_pe_ref, *refs, st: Static):
    c = q_lat_ref.shape[1]
    if len(refs) == 6:  # one [C + R, S] block of the packed cache, slot-minor
        cache_ref, o_ref, lse_ref, acc_ref, m_ref, l_ref = refs
        kv_ref, k_pe_ref = cache_ref.at[:c, :], cache_ref.at[c:, :]
    else:  # a [S, C] latent block and a [R, S] rope block
        kv_ref, k_pe_ref, o_ref, lse_ref, acc_ref, m_ref, l_ref = refs
    kv_slot_minor = len(refs) == 6
    b, p, j = pl.program_id(0), pl.program_id(1), pl.program_id(3)
    bk = st.block_kv
    length = lengths_ref[b]
    block = p * st.blocks_per_split + j
    rows = q_lat_ref.shape[0]

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)

    def run(masked: bool):
        kv, k_pe_RS = kv_ref[...], k_pe_ref[...]  # kv: [C, S] (slot-minor) or [S, C]
        if masked:  # zero garbage slots: 0 * NaN would poison the p @ kv product
            slot_1S = lax.broadcasted_iota(jnp.int32, (1, bk), 1) + block * bk
            k_pe_RS = jnp.where(slot_1S < length, k_pe_RS, jnp.zeros((), k_pe_RS.dtype))
            slot = slot_1S if kv_slot_minor else (
                lax.broadcasted_iota(jnp.int32, (bk, 1), 0) + block * bk)
            kv = jnp.where(slot < length, kv, jnp.zeros((), kv.dtype))
        s_YS = kernel_dot(q_lat_ref[...], kv, _NN if kv_slot_minor else _NT)
        s_YS += kernel_dot(q_pe_ref[...], k_pe_RS, _NN)
        s_YS *= st.sm_scale
        if masked:
            limit_Y1 = (length - st.t_len + row_t_ref[...]) if st.causal else (
                jnp.zeros((rows, 1), jnp.int32) + (length - 1))
            col_YS = lax.broadcasted_iota(jnp.int32, s_YS.shape, 1) + block * bk
            s_YS = jnp.where(col_YS <= limit_Y1, s_YS, -jnp.inf)
        m_new, alpha_Y1, p_YS, l_ref[...] = online_softmax_step(m_ref[...], l_ref[...], s_YS)
        acc_ref[...] = alpha_Y1 * acc_ref[...] + kernel_dot(
            p_YS.astype(kv.dtype), kv, _NT if kv_slot_minor else _NN)
        m_ref[...] = m_new

    # Blocks every row sees entirely need no mask (the common case for T = 1).
    min_limit = length - st.t_len if st.causal else length - 1
    n_full = lax.div(jnp.maximum(min_limit + 1, 0), bk)
    in_use = jnp.logical_and(block < st.num_kv, block * bk < length)
    pl.when(jnp.logical_and(in_use, block < n_full))(lambda: run(False))
    pl.when(jnp.logical_and(in_use, block >= n_full))(lambda: run(True))

    @pl.when(j == st.blocks_per_split - 1)
    def _finish():
        l_Y1 = l_ref[...]
        empty = l_Y1 == 0.0
        l_safe = jnp.where(empty, 1.0, l_Y1)
        o_ref[...] = acc_ref[...] / l_safe
        lse_ref[...] = jnp.where(empty, -jnp.inf, m_ref[...] + jnp.log(l_safe))


def latent_decode(st: Static, splits: int, rows: int, interpret: Any, lengths_B: jax.Array,
                  row_t_Y1: jax.Array, q_lat_BYC: jax.Array, q_pe_BYR: jax.Array,
                  kv_BSC: jax.Array,
                  k_pe_BSR: jax.Array | None = None) -> list[jax.Array]:
    """Split partials (o [B, O, Y, C] f32, lse [B, O, Y, 1] f32) of the decode attention.

    The cache is either `kv_BSC` and `k_pe_BSR`, or (k_pe_BSR=None) the packed [B, S, C + R]
    array. XLA:TPU lays out an array whose minor dim is not a multiple of 128 (C + R = 576,
    R = 64) slot-minor, so the kernel reads those as [B, C + R, S] / [B, R, S]: the transpose
    is then a free relabelling of the same bytes, where a [S, C + R] block would make XLA copy
    the whole cache into row-major order first, every step."""
    b, m, c = q_lat_BYC.shape
    r = q_pe_BYR.shape[-1]
    bk = st.block_kv

    def kv_block(b_, p, j, lengths_ref):
        return jnp.minimum(p * st.blocks_per_split + j, _last_block(lengths_ref[b_], st))

    def slots_minor(b_, p, i, j, lengths_ref):  # [B, D, S] blocks of [D, block]
        return b_, 0, kv_block(b_, p, j, lengths_ref)

    def slots_major(b_, p, i, j, lengths_ref):  # [B, S, D] blocks of [block, D]
        return b_, kv_block(b_, p, j, lengths_ref), 0

    def row_index(b_, p, i, j, lengths_ref):
        return b_, i, 0

    def out_index(b_, p, i, j, lengths_ref):
        return b_, p, i, 0

    if k_pe_BSR is None:
        cache = (jnp.swapaxes(kv_BSC, 1, 2),)
        cache_specs = [pl.BlockSpec((None, c + r, bk), slots_minor)]
    else:
        cache = (kv_BSC, jnp.swapaxes(k_pe_BSR, 1, 2))
        cache_specs = [pl.BlockSpec((None, bk, c), slots_major),
                       pl.BlockSpec((None, r, bk), slots_minor)]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, splits, m // rows, st.blocks_per_split),
        in_specs=[
            pl.BlockSpec((rows, 1), lambda b_, p, i, j, lengths_ref: (i, 0)),
            pl.BlockSpec((None, rows, c), row_index),
            pl.BlockSpec((None, rows, r), row_index),
        ] + cache_specs,
        out_specs=[pl.BlockSpec((None, None, rows, c), out_index),
                   pl.BlockSpec((None, None, rows, 1), out_index)],
        scratch_shapes=[pltpu.VMEM((rows, c), jnp.float32), pltpu.VMEM((rows, 1), jnp.float32),
                        pltpu.VMEM((rows, 1), jnp.float32)],
    )
    return pl.pallas_call(
        functools.partial(_kernel, st=st),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((b, splits, m, c), jnp.float32),
                   jax.ShapeDtypeStruct((b, splits, m, 1), jnp.float32)],
        interpret=interpret, name="latent_attention_decode",
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
    )(lengths_B, row_t_Y1, q_lat_BYC, q_pe_BYR, *cache)
