"""Absorbed-MLA decode over the latent cache (FlashMLA's "MQA mode"), split-KV Pallas kernel.

Legend: see layers.py (B batch, T query len, S cache slots, N heads, C kv latent rank, R rope
dim, Y = T * N query rows: all heads of all queries share one key/value stream); O the splits
of the cache.

Every query row attends to the shared key [c; k_pe] (C + R) and value c (C). The T queries
are the last T positions of each sequence: query t is at position lengths_B - T + t and, when
causal, sees cache slots s <= lengths_B - T + t; slots s >= lengths_B are garbage (even NaN)
and never reach the output. T = 1 is decode, T > 1 speculative verification.

Split-KV ("flash decoding"): the grid is (B, O, row blocks); split p scans its share of the
cache, skipping blocks at or beyond the sequence length, and writes a normalised partial
output with its log-sum-exp; an XLA combine step merges the O partials (LSE-weighted).
Forward only.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import dispatch
from pallas_kernels import latent_attention_tpu as latent_tpu
from pallas_kernels.dispatch import kernel_dot
from pallas_kernels.latent_attention_reference import (
    DEFAULT_BLOCK_KV,
    latent_attention_reference,
)

_NT = (((1,), (1,)), ((), ()))
_NN = (((1,), (0,)), ((), ()))
_TARGET_PROGRAMS = 264  # ~2 waves of an H100/H200's 132 SMs; an untuned guess


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles of the decode kernel. Untuned (no GPU/TPU was available when chosen).

    block_kv: cache slots per inner-loop step (multiple of 8).
    block_rows: query rows (T * N folded) per program (multiple of 8); GPU needs a power of
      two >= 16. Rows are zero-padded up to a multiple of it.
    num_splits: cache splits O; None picks enough programs to fill the device.
    block_kv_xla: cache chunk of implementation="xla".
    """

    block_kv: int = 64
    block_rows: int = 32  # a 32 x C=512 f32 accumulator is already 64 KiB of registers
    num_splits: int | None = None
    block_kv_xla: int = DEFAULT_BLOCK_KV
    num_warps: int = 8  # GPU only (Triton)
    num_stages: int = 2  # GPU only (Triton)

    def __post_init__(self):
        dispatch.check_block_sizes(self)

    @classmethod
    def get_default(cls, implementation: str | None = None,
                    device_kind: str | None = None) -> BlockSizes:
        """Tiles for an implementation and the device compiled for (`device_kind`; None:
        `dispatch.target_device_kind()` for "tpu" / "gpu")."""
        return cls(**dispatch.default_blocks(implementation, device_kind, TPU_BLOCKS,
                                             GPU_BLOCKS))


# Per device kind (the longest matching prefix of `device_kind`; "" is the default). Chosen
# from the compilers' VMEM / shared-memory verdicts at C = 512, R = 64, not timed: no TPU or
# GPU was available to tune them.
# TPU: the cache streams through VMEM one block at a time (~3 MiB against 16 MiB scoped).
TPU_BLOCKS = {"": dict(block_kv=512, block_rows=256)}
# GPU (Triton): a [block_kv, C] bf16 tile per pipeline stage plus the [block_rows, C] queries
# and accumulator; 64-slot tiles with two stages ask 236 KiB, over Hopper's 227 KiB.
GPU_BLOCKS = {"": dict(block_kv=32, block_rows=32, num_stages=2)}


def _kernel(lengths_ref, row_t_ref, q_lat_ref, q_pe_ref, *refs, st: latent_tpu.Static):
    c, r = q_lat_ref.shape[1], q_pe_ref.shape[1]
    if len(refs) == 3:  # the packed [S, C + R] cache: latent columns first, then rope
        cache_ref, o_ref, lse_ref = refs

        def read(ks):
            return cache_ref[ks, pl.ds(0, c)], cache_ref[ks, pl.ds(c, r)]
    else:
        kv_ref, k_pe_ref, o_ref, lse_ref = refs

        def read(ks):
            return kv_ref[ks, :], k_pe_ref[ks, :]
    b, p = pl.program_id(2), pl.program_id(1)
    bk = st.block_kv
    length = lengths_ref[b]
    q_lat_YC, q_pe_YR = q_lat_ref[...], q_pe_ref[...]
    rows = q_lat_YC.shape[0]
    # Last visible slot of each row; <= length - 1, so it also hides the garbage slots.
    limit_Y1 = (length - st.t_len + row_t_ref[...]) if st.causal else (
        jnp.zeros((rows, 1), jnp.int32) + (length - 1))
    first = p * st.blocks_per_split
    hi = jnp.minimum(jnp.minimum(first + st.blocks_per_split, st.num_kv),
                     lax.div(jnp.maximum(length, 0) + bk - 1, bk))
    # Blocks every row sees entirely need no mask (the common case for T = 1).
    min_limit = length - st.t_len if st.causal else length - 1
    n_full = jnp.clip(lax.div(jnp.maximum(min_limit + 1, 0), bk), first, jnp.maximum(hi, first))

    def body(j, carry, masked):
        acc_YC, m_Y1, l_Y1 = carry
        ks = pl.ds(pl.multiple_of(j * bk, bk), bk)
        kv_SC, k_pe_SR = read(ks)
        if masked:  # zero garbage slots: 0 * NaN would poison the p @ kv product
            valid_S1 = lax.broadcasted_iota(jnp.int32, (bk, 1), 0) + j * bk < length
            kv_SC = jnp.where(valid_S1, kv_SC, jnp.zeros((), kv_SC.dtype))
            k_pe_SR = jnp.where(valid_S1, k_pe_SR, jnp.zeros((), k_pe_SR.dtype))
        s_YS = kernel_dot(q_lat_YC, kv_SC, _NT)
        s_YS += kernel_dot(q_pe_YR, k_pe_SR, _NT)
        s_YS *= st.sm_scale
        if masked:
            col_YS = lax.broadcasted_iota(jnp.int32, s_YS.shape, 1) + j * bk
            s_YS = jnp.where(col_YS <= limit_Y1, s_YS, -jnp.inf)
        m_new = jnp.maximum(m_Y1, jnp.max(s_YS, axis=1, keepdims=True))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha_Y1 = jnp.exp(m_Y1 - m_safe)
        p_YS = jnp.exp(s_YS - m_safe)
        l_Y1 = alpha_Y1 * l_Y1 + jnp.sum(p_YS, axis=1, keepdims=True)
        acc_YC = alpha_Y1 * acc_YC + kernel_dot(p_YS.astype(kv_SC.dtype), kv_SC, _NN)
        return acc_YC, m_new, l_Y1

    carry = (jnp.zeros(q_lat_YC.shape, jnp.float32), jnp.full((rows, 1), -jnp.inf, jnp.float32),
             jnp.zeros((rows, 1), jnp.float32))
    carry = lax.fori_loop(first, n_full, functools.partial(body, masked=False), carry)
    carry = lax.fori_loop(n_full, hi, functools.partial(body, masked=True), carry)
    acc_YC, m_Y1, l_Y1 = carry
    empty = l_Y1 == 0.0
    l_safe = jnp.where(empty, 1.0, l_Y1)
    o_ref[...] = acc_YC / l_safe
    lse_ref[...] = jnp.where(empty, -jnp.inf, m_Y1 + jnp.log(l_safe))


def _num_splits(bs: BlockSizes, backend, b: int, row_blocks: int, num_kv: int, bk: int) -> int:
    if bs.num_splits is not None:
        return min(bs.num_splits, num_kv)
    if backend.head_major:  # TPU: two splits keep both TensorCores of a megacore chip busy
        return 1 if b * row_blocks > 1 else min(2, num_kv)
    return max(1, min(num_kv, -(-_TARGET_PROGRAMS // (b * row_blocks))))


def _check_shapes(q_latent_BTNC, q_pe_BTNR, kv_latent_BSC, k_pe_BSR, lengths_B):
    dispatch.check_named_shapes(q_latent_BTNC=q_latent_BTNC, q_pe_BTNR=q_pe_BTNR,
                                kv_latent_BSC=kv_latent_BSC, k_pe_BSR=k_pe_BSR,
                                lengths_B=lengths_B)


_STATIC = ("sm_scale", "causal", "implementation", "block_sizes")


@functools.partial(jax.jit, static_argnames=_STATIC)
def latent_attention(q_latent_BTNC: jax.Array, q_pe_BTNR: jax.Array, kv_latent_BSC: jax.Array,
                     k_pe_BSR: jax.Array, *, lengths_B: jax.Array, sm_scale: float,
                     causal: bool = True, implementation: str | None = None,
                     block_sizes: BlockSizes | None = None) -> jax.Array:
    """Absorbed MLA decode attention over the latent cache. Forward only.

    Args:
      q_latent_BTNC: queries already multiplied by W_UK (q~ = W_UK^T q_nope).
      q_pe_BTNR: rope part of the queries.
      kv_latent_BSC, k_pe_BSR: the latent cache (c_KV after its norm, k_pe after rope).
      lengths_B: valid slots per sequence (int); slots >= length are ignored.
      sm_scale: softmax scale (Python float, static).
      causal: query t sees slots s <= lengths_B - T + t; else all slots < lengths_B.
      implementation: see `pallas_kernels.dispatch`.
      block_sizes: kernel tiles; None uses `BlockSizes.get_default(implementation)`.
    Returns:
      out_BTNC (still to be multiplied by W_UV), in q_latent's dtype.
    """
    _check_shapes(q_latent_BTNC, q_pe_BTNR, kv_latent_BSC, k_pe_BSR, lengths_B)
    return _latent_attention(q_latent_BTNC, q_pe_BTNR, kv_latent_BSC, k_pe_BSR, lengths_B,
                             sm_scale, causal, implementation, block_sizes)


@functools.partial(jax.jit, static_argnames=_STATIC)
def latent_attention_cache(q_latent_BTNC: jax.Array, q_pe_BTNR: jax.Array, cache_BSL: jax.Array,
                           *, lengths_B: jax.Array, sm_scale: float, causal: bool = True,
                           implementation: str | None = None,
                           block_sizes: BlockSizes | None = None) -> jax.Array:
    """`latent_attention` over the packed cache the model keeps: [B, S, C + R], the latent
    c_KV first, then the rope key. The kernels read it in place (on GPU when C and R are
    powers of two >= 16, as in DeepSeek's 512 + 64; otherwise its two parts are split and
    padded first, a copy); implementation="xla" slices it."""
    c = q_latent_BTNC.shape[-1]
    dispatch.check_named_shapes(q_latent_BTNC=q_latent_BTNC, q_pe_BTNR=q_pe_BTNR,
                                cache_BSL=cache_BSL, lengths_B=lengths_B)
    if cache_BSL.shape[-1] != c + q_pe_BTNR.shape[-1]:
        raise ValueError(f"cache_BSL has L={cache_BSL.shape[-1]}, expected C + R = "
                         f"{c} + {q_pe_BTNR.shape[-1]}")
    impl = dispatch.resolve(implementation)
    pow2 = all(d == dispatch.next_pow2(d) >= 16 for d in (c, q_pe_BTNR.shape[-1]))
    if impl in ("tpu", "tpu_interpret", "interpret") or (impl == "gpu" and pow2):
        return _latent_attention(q_latent_BTNC, q_pe_BTNR, cache_BSL, None, lengths_B,
                                 sm_scale, causal, implementation, block_sizes)
    return _latent_attention(q_latent_BTNC, q_pe_BTNR, cache_BSL[..., :c], cache_BSL[..., c:],
                             lengths_B, sm_scale, causal, implementation, block_sizes)


def _latent_attention(q_latent_BTNC, q_pe_BTNR, kv_BSC, k_pe_BSR, lengths_B, sm_scale, causal,
                      implementation, block_sizes):
    """The decode attention; k_pe_BSR=None: kv_BSC is the packed [B, S, C + R] cache."""
    if not jnp.issubdtype(lengths_B.dtype, jnp.integer):
        raise ValueError(f"lengths_B must be integer, got {lengths_B.dtype}")
    impl = dispatch.resolve(implementation)
    bs = block_sizes or BlockSizes.get_default(impl)
    lengths_B = lengths_B.astype(jnp.int32)
    if impl == "xla":
        return latent_attention_reference(q_latent_BTNC, q_pe_BTNR, kv_BSC, k_pe_BSR,
                                          lengths_B=lengths_B, sm_scale=sm_scale,
                                          causal=causal, block_kv=bs.block_kv_xla)
    backend = dispatch.KernelBackend(impl)
    b, t, n, c = q_latent_BTNC.shape
    s, r = kv_BSC.shape[1], q_pe_BTNR.shape[-1]
    packed = k_pe_BSR is None
    m = t * n
    bk = dispatch.fit_block(bs.block_kv, s)
    rows = dispatch.fit_block(bs.block_rows, m)
    if backend.pow2_tiles and any(x != dispatch.next_pow2(x) or x < 16 for x in (bk, rows)):
        raise ValueError(f"block_kv={bk} and block_rows={rows}: the GPU kernel needs powers of "
                         "two >= 16")
    m_pad, s_pad = dispatch.round_up(m, rows), dispatch.round_up(s, bk)
    c_pad, r_pad = c, r
    if backend.pow2_tiles:
        c_pad, r_pad = max(16, dispatch.next_pow2(c)), max(16, dispatch.next_pow2(r))

    def pad(x, length, length_pad, d, d_pad):  # only copies when something is padded
        if (length, d) == (length_pad, d_pad):
            return x
        return jnp.pad(x, [(0, 0), (0, length_pad - length), (0, d_pad - d)])

    q_lat_BYC = pad(q_latent_BTNC.reshape(b, m, c), m, m_pad, c, c_pad)
    q_pe_BYR = pad(q_pe_BTNR.reshape(b, m, r), m, m_pad, r, r_pad)
    # Padding the cache copies it: allocate caches with S a multiple of block_kv.
    if packed:
        kv_BSC = pad(kv_BSC, s, s_pad, c + r, c + r)
    else:
        kv_BSC = pad(kv_BSC, s, s_pad, c, c_pad)
        k_pe_BSR = pad(k_pe_BSR, s, s_pad, r, r_pad)
    row_t_Y1 = jnp.minimum(jnp.arange(m_pad, dtype=jnp.int32) // n, t - 1)[:, None]

    num_kv, row_blocks = s_pad // bk, m_pad // rows
    splits = _num_splits(bs, backend, b, row_blocks, num_kv, bk)
    per_split = -(-num_kv // splits)
    splits = -(-num_kv // per_split)  # no statically empty trailing split
    if backend.head_major:
        st = latent_tpu.Static(sm_scale=float(sm_scale), causal=bool(causal), t_len=t,
                               block_kv=bk, blocks_per_split=per_split, num_kv=num_kv)
        o_BOYC, lse_BOY1 = latent_tpu.latent_decode(st, splits, rows, backend.interpret(),
                                                    lengths_B, row_t_Y1, q_lat_BYC, q_pe_BYR,
                                                    kv_BSC, k_pe_BSR)
    else:
        o_BOYC, lse_BOY1 = _portable_decode(backend, bs, sm_scale, causal, t, bk, per_split,
                                            num_kv, splits, rows, lengths_B, row_t_Y1,
                                            q_lat_BYC, q_pe_BYR, kv_BSC, k_pe_BSR)
    out_BYC = combine_splits(o_BOYC, lse_BOY1)
    return out_BYC[:, :m, :c].reshape(b, t, n, c).astype(q_latent_BTNC.dtype)


def _portable_decode(backend, bs, sm_scale, causal, t, bk, per_split, num_kv, splits, rows,
                     lengths_B, row_t_Y1, q_lat_BYC, q_pe_BYR, kv_BSC, k_pe_BSR):
    """The GPU / interpret kernel: each program loops over its split's cache blocks. On GPU
    program_id(0) varies fastest: the row blocks of one split run side by side and share its
    cache slice through L2."""
    b, m_pad, c_pad = q_lat_BYC.shape
    r_pad, s_pad = q_pe_BYR.shape[-1], kv_BSC.shape[1]
    cache = (kv_BSC,) if k_pe_BSR is None else (kv_BSC, k_pe_BSR)

    def spec(shape, index):  # index takes (b, p, i); the grid is (row blocks, splits, b)
        return pl.BlockSpec(shape, lambda g0, g1, g2: index(g2, g1, g0))

    st = latent_tpu.Static(sm_scale=float(sm_scale), causal=bool(causal), t_len=t, block_kv=bk,
                 blocks_per_split=per_split, num_kv=num_kv)
    return pl.pallas_call(
        functools.partial(_kernel, st=st),
        grid=(m_pad // rows, splits, b),
        in_specs=[
            pl.BlockSpec(memory_space=None),  # the lengths, read whole as scalars
            spec((rows, 1), lambda b_, p, i: (i, 0)),
            spec((None, rows, c_pad), lambda b_, p, i: (b_, i, 0)),
            spec((None, rows, r_pad), lambda b_, p, i: (b_, i, 0)),
        ] + [spec((None, s_pad, x.shape[-1]), lambda b_, p, i: (b_, 0, 0)) for x in cache],
        out_specs=[spec((None, None, rows, c_pad), lambda b_, p, i: (b_, p, i, 0)),
                   spec((None, None, rows, 1), lambda b_, p, i: (b_, p, i, 0))],
        out_shape=[jax.ShapeDtypeStruct((b, splits, m_pad, c_pad), jnp.float32),
                   jax.ShapeDtypeStruct((b, splits, m_pad, 1), jnp.float32)],
        interpret=backend.interpret(), name="latent_attention_decode",
        compiler_params=backend.compiler_params(num_warps=bs.num_warps,
                                                num_stages=bs.num_stages),
    )(lengths_B, row_t_Y1, q_lat_BYC, q_pe_BYR, *cache)


def combine_splits(o_BOYC: jax.Array, lse_BOY1: jax.Array) -> jax.Array:
    """Merges split partials: out = sum_p w_p o_p / sum_p w_p with w_p = exp(lse_p - max)."""
    if o_BOYC.shape[1] == 1:
        return o_BOYC[:, 0]
    lse_max_BY1 = jnp.max(lse_BOY1, axis=1)
    lse_max_BY1 = jnp.where(jnp.isfinite(lse_max_BY1), lse_max_BY1, 0.0)
    w_BOY1 = jnp.exp(lse_BOY1 - lse_max_BY1[:, None])
    total_BY1 = jnp.sum(w_BOY1, axis=1)
    out_BYC = jnp.einsum("BOYC,BOY->BYC", o_BOYC, w_BOY1[..., 0])
    return out_BYC / jnp.where(total_BY1 == 0.0, 1.0, total_BY1)
