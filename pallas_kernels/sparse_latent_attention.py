"""Sparse absorbed-MLA decode (DeepSeek-V3.2's DSA): each query attends to its own K cache
slots, gathered by index inside the kernel's loop.

Legend: see layers.py (B batch, T query len, S cache slots, N heads, C kv latent rank, R rope
dim, L = C + R, K selected slots per query); O the splits of the K slots, Y query rows.

Semantics as `sparse_latent_attention_reference` (its docstring): query t of sequence b sees
only the slots indices_BTK[b, t, :] (-1: none), with the shared key [c; k_pe] and value c
of the packed [B, S, C + R] cache; softmax in f32; no causal mask (the indices are visible
slots by contract). The queries of one (b, t) share one index list, so a program takes the
heads of one query (Y = N, or a block of them), never two queries.

Split-K, as the dense decode splits S: split p takes K / O of the indices and writes a
normalised partial with its log-sum-exp; `combine_splits` merges them. Forward only.
  GPU / interpret: program (row block, split, b * T + t) loops over its indices in blocks,
    loading the rows of each block with one gather load (Triton: a pointer per row).
  TPU / tpu_interpret: `sparse_latent_attention_tpu` (a DMA per selected row, double-
    buffered; the cache read in the layout of `sparse_latent_attention_tpu.cache_layout`).
No [B, T, K, L] copy of the selected rows is made outside the kernel.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import dispatch
from pallas_kernels import sparse_latent_attention_tpu as sparse_tpu
from pallas_kernels.dispatch import kernel_dot, online_softmax_step
from pallas_kernels.latent_attention import combine_splits
from pallas_kernels.sparse_latent_attention_reference import (
    DEFAULT_BLOCK_K,
    sparse_latent_attention_reference,
)

_NT = (((1,), (1,)), ((), ()))
_NN = (((1,), (0,)), ((), ()))
_TARGET_PROGRAMS = 264  # ~2 waves of an H100/H200's 132 SMs, as the dense decode; untuned
_TPU_LANES = 128


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles of the sparse decode kernel.

    block_k: selected slots per inner-loop step (multiple of 8; on TPU of 128, on GPU a power
      of two >= 16). K is padded with -1 up to a multiple of it.
    block_rows: heads of one query per program (multiple of 8; GPU: a power of two >= 16).
    num_splits: splits O of the K indices; None picks enough programs to fill the device.
    block_k_xla: indices per scan step of implementation="xla".
    num_warps, num_stages: Triton launch parameters (GPU only).
    vmem_limit_bytes: Mosaic's scoped VMEM limit (TPU only); None: the compiler's default.
    """

    block_k: int = 64
    block_rows: int = 32
    num_splits: int | None = None
    block_k_xla: int = DEFAULT_BLOCK_K
    num_warps: int = 8
    num_stages: int = 2
    vmem_limit_bytes: int | None = None

    def __post_init__(self):
        dispatch.check_block_sizes(self)

    @classmethod
    def get_default(cls, implementation: str | None = None,
                    device_kind: str | None = None) -> BlockSizes:
        """Tiles for an implementation and the device compiled for (`device_kind`; None:
        `dispatch.target_device_kind()` for "tpu" / "gpu")."""
        return cls(**dispatch.default_blocks(implementation, device_kind, TPU_BLOCKS,
                                             GPU_BLOCKS))


# Per device kind (longest matching prefix of `device_kind`; "" is the default). Chosen to fit
# the compilers' VMEM / shared-memory verdicts at V3.2 shapes (N = 128, C = 512, R = 64,
# K = 2048), not tuned for speed: no TPU or GPU was available to time them.
# TPU: all 128 heads of a query per program; VMEM holds two [block_k, 2, L] DMA buffers, the
# queries, and the block's rows and scores. Scoped VMEM asked at B = 1, T = 1 / B = 64, T = 2:
# v5p, block_k=128: 4.5 / 5.0 MiB of 16 MiB (256 asks 7.7 MiB, too near half the limit); v6e,
# 256: 5.5 / 5.8 MiB of 32 MiB; TPU7x, 256: compiles under a 4.9 / 5.5 MiB limit (it reports
# the whole limit as the kernel's VMEM).
TPU_BLOCKS = {"": dict(block_k=128, block_rows=128),
              "TPU v6": dict(block_k=256, block_rows=128),
              "TPU7x": dict(block_k=256, block_rows=128)}
# GPU (Triton): 32 gathered rows of 576 bf16 and a [32, C] f32 accumulator per program, the
# dense decode's tiles; shared memory 100 KiB (B = 1) / 74 KiB (B = 64) of Hopper's 227 KiB.
GPU_BLOCKS = {"": dict(block_k=32, block_rows=32, num_stages=2)}


def _num_splits(bs: BlockSizes, head_major: bool, programs: int, num_blocks: int) -> int:
    """Splits O of the K indices, for `programs` = B * T * row blocks programs without it."""
    if bs.num_splits is not None:
        return min(bs.num_splits, num_blocks)
    if head_major:  # TPU: two splits keep both TensorCores of a megacore chip busy
        return 1 if programs > 1 else min(2, num_blocks)
    return max(1, min(num_blocks, -(-_TARGET_PROGRAMS // programs)))


def _portable_kernel(idx_ref, q_lat_ref, q_pe_ref, *refs, sm_scale: float, block_k: int):
    c, r = q_lat_ref.shape[1], q_pe_ref.shape[1]
    if len(refs) == 3:  # the packed [S, C + R] cache: latent columns first, then rope
        cache_ref, o_ref, lse_ref = refs

        def gather(slots_S):
            return cache_ref[slots_S, pl.ds(0, c)], cache_ref[slots_S, pl.ds(c, r)]
    else:  # the latent and rope parts split and padded (dims that are not powers of two)
        kv_ref, k_pe_ref, o_ref, lse_ref = refs

        def gather(slots_S):
            return kv_ref[slots_S, :], k_pe_ref[slots_S, :]
    rows = q_lat_ref.shape[0]
    q_lat_YC, q_pe_YR = q_lat_ref[...], q_pe_ref[...]

    def body(j, carry):
        acc_YC, m_Y1, l_Y1 = carry
        idx_S = idx_ref[pl.ds(pl.multiple_of(j * block_k, block_k), block_k)]
        valid_S = idx_S >= 0
        kv_SC, k_pe_SR = gather(jnp.where(valid_S, idx_S, 0))
        # Skipped slots read row 0, which may be garbage (NaN): zero them, as 0 * NaN in
        # p @ kv would poison the row.
        kv_SC = jnp.where(valid_S[:, None], kv_SC, jnp.zeros((), kv_SC.dtype))
        k_pe_SR = jnp.where(valid_S[:, None], k_pe_SR, jnp.zeros((), k_pe_SR.dtype))
        s_YS = kernel_dot(q_lat_YC, kv_SC, _NT)
        s_YS += kernel_dot(q_pe_YR, k_pe_SR, _NT)
        s_YS = jnp.where(valid_S[None, :], s_YS * sm_scale, -jnp.inf)
        m_new, alpha_Y1, p_YS, l_Y1 = online_softmax_step(m_Y1, l_Y1, s_YS)
        acc_YC = alpha_Y1 * acc_YC + kernel_dot(p_YS.astype(kv_SC.dtype), kv_SC, _NN)
        return acc_YC, m_new, l_Y1

    carry = (jnp.zeros(q_lat_YC.shape, jnp.float32), jnp.full((rows, 1), -jnp.inf, jnp.float32),
             jnp.zeros((rows, 1), jnp.float32))
    acc_YC, m_Y1, l_Y1 = lax.fori_loop(0, idx_ref.shape[0] // block_k, body, carry)
    empty = l_Y1 == 0.0
    l_safe = jnp.where(empty, 1.0, l_Y1)
    o_ref[...] = acc_YC / l_safe
    lse_ref[...] = jnp.where(empty, -jnp.inf, m_Y1 + jnp.log(l_safe))


def _portable_decode(backend, bs, sm_scale, bk, rows, t, indices_ZOK, q_lat_ZYC, q_pe_ZYR,
                     cache):
    """The GPU / interpret kernel; Z = B * T query positions. Grid (row blocks, O, Z): on GPU
    program_id(0) varies fastest, so the row blocks of one split run side by side and share
    its gathered rows through L2."""
    z, splits, kps = indices_ZOK.shape
    _, m_pad, c_pad = q_lat_ZYC.shape
    r_pad = q_pe_ZYR.shape[-1]

    def spec(shape, index):  # index takes (z, p, i)
        return pl.BlockSpec(shape, lambda g0, g1, g2: index(g2, g1, g0))

    return pl.pallas_call(
        functools.partial(_portable_kernel, sm_scale=float(sm_scale), block_k=bk),
        grid=(m_pad // rows, splits, z),
        in_specs=[
            spec((None, None, kps), lambda z_, p, i: (z_, p, 0)),
            spec((None, rows, c_pad), lambda z_, p, i: (z_, i, 0)),
            spec((None, rows, r_pad), lambda z_, p, i: (z_, i, 0)),
        ] + [spec((None, *x.shape[1:]), lambda z_, p, i: (z_ // t, 0, 0)) for x in cache],
        out_specs=[spec((None, None, rows, c_pad), lambda z_, p, i: (z_, p, i, 0)),
                   spec((None, None, rows, 1), lambda z_, p, i: (z_, p, i, 0))],
        out_shape=[jax.ShapeDtypeStruct((z, splits, m_pad, c_pad), jnp.float32),
                   jax.ShapeDtypeStruct((z, splits, m_pad, 1), jnp.float32)],
        interpret=backend.interpret(), name="sparse_latent_attention_decode",
        compiler_params=backend.compiler_params(num_warps=bs.num_warps,
                                                num_stages=bs.num_stages),
    )(indices_ZOK, q_lat_ZYC, q_pe_ZYR, *cache)


_STATIC = ("sm_scale", "implementation", "block_sizes")


@functools.partial(jax.jit, static_argnames=_STATIC)
def sparse_latent_attention_cache(q_latent_BTNC: jax.Array, q_pe_BTNR: jax.Array,
                                  kv_BSL: jax.Array, indices_BTK: jax.Array, *, sm_scale: float,
                                  block_sizes: BlockSizes | None = None,
                                  implementation: str | None = None) -> jax.Array:
    """Sparse absorbed-MLA decode over the packed latent cache. Forward only.

    Args:
      q_latent_BTNC: queries already multiplied by W_UK (q~ = W_UK^T q_nope).
      q_pe_BTNR: rope part of the queries.
      kv_BSL: the model's packed cache [B, S, C + R]: c_KV after its norm, then k_pe after
        rope. On TPU it is read in place when held in `sparse_latent_attention_tpu.
        cache_layout(dtype)` (otherwise XLA relays it out first, a copy) and S is even.
      indices_BTK: int, the K cache slots each query attends to; < 0: none. Non-negative
        indices must be valid, visible slots (not checked; no causal mask applied). A slot
        listed twice counts twice in the softmax, as in the blocked reference (the
        indexer's top-k never lists one twice; the mask-based oracle counts it once).
      sm_scale: softmax scale (Python float, static).
      block_sizes: kernel tiles; None uses `BlockSizes.get_default(implementation)`.
      implementation: see `pallas_kernels.dispatch`.
    Returns:
      out_BTNC (still to be multiplied by W_UV), in q_latent's dtype; 0 for a query without
      a valid index.
    """
    dispatch.check_named_shapes(q_latent_BTNC=q_latent_BTNC, q_pe_BTNR=q_pe_BTNR,
                                kv_BSL=kv_BSL, indices_BTK=indices_BTK)
    b, t, n, c = q_latent_BTNC.shape
    r = q_pe_BTNR.shape[-1]
    s, l = kv_BSL.shape[1:]
    k = indices_BTK.shape[-1]
    if l != c + r:
        raise ValueError(f"kv_BSL has L={l}, expected C + R = {c} + {r}")
    if not jnp.issubdtype(indices_BTK.dtype, jnp.integer):
        raise ValueError(f"indices_BTK must be integer, got {indices_BTK.dtype}")
    impl = dispatch.resolve(implementation)
    bs = block_sizes or BlockSizes.get_default(impl)
    indices_BTK = indices_BTK.astype(jnp.int32)
    if impl == "xla":
        return sparse_latent_attention_reference(q_latent_BTNC, q_pe_BTNR, kv_BSL, indices_BTK,
                                                 sm_scale=sm_scale, block_k=bs.block_k_xla)
    backend = dispatch.KernelBackend(impl)
    if backend.head_major:
        if bs.block_k % _TPU_LANES:
            raise ValueError(f"BlockSizes.block_k={bs.block_k}: the TPU kernel needs a "
                             f"multiple of {_TPU_LANES}")
        bk = bs.block_k  # lane-aligned index blocks; a short K is padded with -1
    else:
        bk = dispatch.fit_block(bs.block_k, k)
    rows = dispatch.fit_block(bs.block_rows, n)
    if backend.pow2_tiles and any(x != dispatch.next_pow2(x) or x < 16 for x in (bk, rows)):
        raise ValueError(f"block_k={bk} and block_rows={rows}: the GPU kernel needs powers of "
                         "two >= 16")
    num_blocks = -(-k // bk)
    splits = _num_splits(bs, backend.head_major, b * t * -(-n // rows), num_blocks)
    per_split = -(-num_blocks // splits)
    splits = -(-num_blocks // per_split)  # no statically empty trailing split
    k_pad, n_pad = splits * per_split * bk, dispatch.round_up(n, rows)
    indices_BTOK = jnp.pad(indices_BTK, [(0, 0), (0, 0), (0, k_pad - k)],
                           constant_values=-1).reshape(b, t, splits, per_split * bk)
    pad_heads = [(0, 0), (0, 0), (0, n_pad - n), (0, 0)]
    q_lat_BTNC, q_pe_BTNR = jnp.pad(q_latent_BTNC, pad_heads), jnp.pad(q_pe_BTNR, pad_heads)
    if backend.head_major:
        if s % sparse_tpu.PAIR:  # a copy of the cache; allocate caches with S even
            kv_BSL = jnp.pad(kv_BSL, [(0, 0), (0, s % sparse_tpu.PAIR), (0, 0)])
        st = sparse_tpu.Static(sm_scale=float(sm_scale), block_k=bk,
                               keys_per_split=per_split * bk, latent_dim=c,
                               vmem_limit_bytes=bs.vmem_limit_bytes)
        o_BTONC, lse_BTON1 = sparse_tpu.sparse_decode(st, splits, rows, backend.interpret(),
                                                      indices_BTOK, q_lat_BTNC, q_pe_BTNR,
                                                      kv_BSL)
        o_ZOYC = o_BTONC.reshape(b * t, splits, n_pad, c)
        lse_ZOY1 = lse_BTON1.reshape(b * t, splits, n_pad, 1)
    else:
        c_pad, r_pad = c, r
        if backend.pow2_tiles:
            c_pad, r_pad = max(16, dispatch.next_pow2(c)), max(16, dispatch.next_pow2(r))
        if (c_pad, r_pad) == (c, r):
            cache = (kv_BSL,)  # read in place: column slices of one [S, C + R] ref
        else:  # a copy of the cache, split and zero-padded to Triton's tile sizes
            cache = (jnp.pad(kv_BSL[..., :c], [(0, 0), (0, 0), (0, c_pad - c)]),
                     jnp.pad(kv_BSL[..., c:], [(0, 0), (0, 0), (0, r_pad - r)]))
            q_lat_BTNC = jnp.pad(q_lat_BTNC, [(0, 0)] * 3 + [(0, c_pad - c)])
            q_pe_BTNR = jnp.pad(q_pe_BTNR, [(0, 0)] * 3 + [(0, r_pad - r)])
        o_ZOYC, lse_ZOY1 = _portable_decode(
            backend, bs, sm_scale, bk, rows, t, indices_BTOK.reshape(b * t, splits, -1),
            q_lat_BTNC.reshape(b * t, n_pad, -1), q_pe_BTNR.reshape(b * t, n_pad, -1), cache)
    out_ZYC = combine_splits(o_ZOYC, lse_ZOY1)
    return out_ZYC[:, :n, :c].reshape(b, t, n, c).astype(q_latent_BTNC.dtype)
