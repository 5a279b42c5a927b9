"""Sparse absorbed-MLA decode on TPU (Mosaic): the selected cache rows gathered by DMA.

Legend: see layers.py (B batch, T query len, N heads, C kv latent rank, R rope dim, L = C + R,
K selected slots per query); O the splits of the K slots, S the slots of one block, Y query
rows (the heads of one query).

Grid (B, T, O, N / rows). Program (b, t, p, i) walks split p's share of indices_BTK[b, t] in
blocks of S slots with a `fori_loop`: the indices sit in SMEM; each selected cache row is
copied from HBM (memory space ANY) into a VMEM buffer by its own DMA, and block j + 1's copies
are in flight while block j is computed (two buffers, one DMA semaphore each). The online
softmax runs in f32; VMEM holds two blocks, the queries and a [rows, C] accumulator, whatever
the cache length.

Why rows come in pairs: a DMA moves whole HBM tiles (Mosaic rejects a slice that starts
inside one). XLA:TPU keeps a [B, S, L] array with L not a multiple of 128 slot-minor (slots
along lanes): one slot's L values are one lane in each of L / 16 tiles of 128 slots, so no
DMA can fetch a slot alone. The kernel therefore reads the cache row-major with tiles of two
slots by 128 lanes (`cache_layout`), the finest bfloat16 tiling (two rows share each 32-bit
word), seen as [B, S / 2, 2, L]: the DMA for slot s moves pair s // 2 (a leading index, any
value allowed) and the kernel keeps row s % 2. Storage is L rounded up to 640 lanes (11% over
576); each selected slot moves two rows. A cache held in XLA's default layout is relaid out
before the kernel (at B = 1, S = 160K on v5p: 420 MB of temporaries for a 189 MB cache, every
step): callers keep it in `cache_layout` (`jax.experimental.layout.Format`) so that the
kernel reads it in place.
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
# Slots per DMA: the rows of one HBM tile of `cache_layout`.
PAIR = 2


def cache_layout(dtype: Any):
    """The HBM layout the TPU kernel reads a [B, S, L] cache in without a copy: row-major,
    tiles of 2 slots x 128 values (16-bit values packed two rows to a 32-bit word)."""
    from jax.experimental.layout import Layout

    packing = 4 // jnp.dtype(dtype).itemsize
    tiling = ((PAIR, 128),) + (((packing, 1),) if packing > 1 else ())
    return Layout(major_to_minor=(0, 1, 2), tiling=tiling)


@dataclasses.dataclass(frozen=True)
class Static:
    """What the sparse decode kernel knows statically."""

    sm_scale: float
    block_k: int  # selected slots per block (S); a multiple of 128
    keys_per_split: int  # K / O, a multiple of block_k
    latent_dim: int  # C: the cache row is [c (C); k_pe (R)]
    vmem_limit_bytes: int | None = None  # None: the compiler's default scoped limit


def _kernel(idx_smem_ref, idx_ref, q_lat_ref, q_pe_ref, cache_hbm_ref, o_ref, lse_ref,
            buf_ref, sem_ref, *, st: Static):
    b = pl.program_id(0)
    bk, c = st.block_k, st.latent_dim
    num_blocks = st.keys_per_split // bk

    def copy(block, slot, i):
        """The DMA of the i-th selected slot of `block` (a valid index) into buffer `slot`."""
        s = idx_smem_ref[0, block * bk + i]
        return pltpu.make_async_copy(cache_hbm_ref.at[b, s // PAIR], buf_ref.at[slot, i],
                                     sem_ref.at[slot])

    def for_valid(block, slot, action):
        """Starts or waits for the copies of a block; -1 indices move nothing."""
        def body(i, carry):
            pl.when(idx_smem_ref[0, block * bk + i] >= 0)(lambda: action(copy(block, slot, i)))
            return carry
        lax.fori_loop(0, bk, body, 0, unroll=8)

    for_valid(0, 0, lambda d: d.start())

    def step(j, carry):
        acc_YC, m_Y1, l_Y1 = carry
        slot = lax.rem(j, 2)

        @pl.when(j + 1 < num_blocks)
        def _prefetch():
            for_valid(j + 1, 1 - slot, lambda d: d.start())

        for_valid(j, slot, lambda d: d.wait())
        idx_1S = idx_ref[:, pl.ds(pl.multiple_of(j * bk, bk), bk)]
        # The slot-major [S, 1] view of this block's indices (selects rows, zeroes skipped ones).
        idx_S1 = jnp.transpose(jnp.broadcast_to(idx_1S, (8, bk)))[:, :1]
        even_SL, odd_SL = buf_ref[slot, :, 0, :], buf_ref[slot, :, 1, :]
        kv_SL = jnp.where(lax.rem(idx_S1, PAIR) == 1, odd_SL, even_SL)
        # A skipped slot's buffer row is stale or never written (possibly NaN): zero it, as
        # 0 * NaN in p @ kv would poison the row.
        kv_SL = jnp.where(idx_S1 >= 0, kv_SL, jnp.zeros((), kv_SL.dtype))
        kv_SC, k_pe_SR = kv_SL[:, :c], kv_SL[:, c:]
        s_YS = kernel_dot(q_lat_ref[...], kv_SC, _NT)
        s_YS += kernel_dot(q_pe_ref[...], k_pe_SR, _NT)
        s_YS = jnp.where(idx_1S >= 0, s_YS * st.sm_scale, -jnp.inf)
        m_new, alpha_Y1, p_YS, l_Y1 = online_softmax_step(m_Y1, l_Y1, s_YS)
        acc_YC = alpha_Y1 * acc_YC + kernel_dot(p_YS.astype(kv_SC.dtype), kv_SC, _NN)
        return acc_YC, m_new, l_Y1

    rows = q_lat_ref.shape[0]
    carry = (jnp.zeros((rows, c), jnp.float32), jnp.full((rows, 1), -jnp.inf, jnp.float32),
             jnp.zeros((rows, 1), jnp.float32))
    acc_YC, m_Y1, l_Y1 = lax.fori_loop(0, num_blocks, step, carry)
    empty = l_Y1 == 0.0
    l_safe = jnp.where(empty, 1.0, l_Y1)
    o_ref[...] = acc_YC / l_safe
    lse_ref[...] = jnp.where(empty, -jnp.inf, m_Y1 + jnp.log(l_safe))


def sparse_decode(st: Static, splits: int, rows: int, interpret: Any, indices_BTOK: jax.Array,
                  q_lat_BTNC: jax.Array, q_pe_BTNR: jax.Array,
                  cache_BSL: jax.Array) -> list[jax.Array]:
    """Split partials (o [B, T, O, N, C] f32, lse [B, T, O, N, 1] f32) of the sparse decode.

    indices_BTOK: [B, T, O, K / O] int32, split p's selected slots (-1: none).
    q_lat_BTNC, q_pe_BTNR: queries, N a multiple of `rows`.
    cache_BSL: the packed cache, S even (it is read as [B, S / 2, 2, L])."""
    b, t, n, c = q_lat_BTNC.shape
    r = q_pe_BTNR.shape[-1]
    s, l = cache_BSL.shape[1:]
    kps = indices_BTOK.shape[-1]
    indices_BTO1K = indices_BTOK[..., None, :]  # (1, K / O) blocks: whole minor dims
    pairs_BPQL = cache_BSL.reshape(b, s // PAIR, PAIR, l)  # Q: the two slots of a pair P

    def per_query(shape):
        return pl.BlockSpec((None, None, *shape), lambda b_, t_, p, i: (b_, t_, i, 0))

    def per_split(shape, **kw):
        return pl.BlockSpec((None, None, None, *shape),
                            lambda b_, t_, p, i: (b_, t_, p) + (0,) * len(shape), **kw)

    return pl.pallas_call(
        functools.partial(_kernel, st=st),
        grid=(b, t, splits, n // rows),
        in_specs=[
            per_split((1, kps), memory_space=pltpu.SMEM),  # addresses for the DMAs
            per_split((1, kps)),  # the same indices as a vector, for the masks
            per_query((rows, c)),
            per_query((rows, r)),
            pl.BlockSpec(memory_space=pl.ANY),
        ],
        out_specs=[pl.BlockSpec((None, None, None, rows, c),
                                lambda b_, t_, p, i: (b_, t_, p, i, 0)),
                   pl.BlockSpec((None, None, None, rows, 1),
                                lambda b_, t_, p, i: (b_, t_, p, i, 0))],
        out_shape=[jax.ShapeDtypeStruct((b, t, splits, n, c), jnp.float32),
                   jax.ShapeDtypeStruct((b, t, splits, n, 1), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((2, st.block_k, PAIR, l), cache_BSL.dtype),
                        pltpu.SemaphoreType.DMA((2,))],
        interpret=interpret, name="sparse_latent_attention_decode",
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "parallel"),
            vmem_limit_bytes=st.vmem_limit_bytes),
    )(indices_BTO1K, indices_BTO1K, q_lat_BTNC, q_pe_BTNR, pairs_BPQL)
