"""MLA flash attention for training and prefill: Pallas forward, dq and dk/dv kernels.

Legend: B batch, T query len, S key len, N heads, H qk nope head dim, R rope dim,
V value head dim.

score = sm_scale * (q_nope . k_nope + q_pe . k_pe), where k_pe_BSR is one rope key per token
shared by every head: it is read per key block by each head's program and never broadcast to
[B, S, N, R] in memory. V may differ from H + R.

Causal convention when T != S: the T queries are the last T of the S positions, so query t is
at absolute position S - T + t and sees keys s <= S - T + t. Rows that see no key output 0.
Explicit positions (`q_positions` [T], `k_positions` [S], e.g. the zigzag layout of context
parallelism, where a shard's queries are two chunks far apart) replace that convention: query
t sees key s when k_positions[s] <= q_positions[t], and blocks are skipped from the positions'
per-block bounds (exact when positions increase along T and S; correct for any).

Any T and S are accepted: both are zero-padded up to the block sizes inside the wrapper (a
copy only when they are not multiples already); padded keys are masked, padded queries are
dropped. On GPU (Triton) head dims that are not powers of two are zero-padded too.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import dispatch
from pallas_kernels import mla_attention_kernels as kernels
from pallas_kernels import mla_attention_tpu as tpu_kernels
from pallas_kernels.mla_attention_reference import (
    DEFAULT_BLOCK_KV,
    mla_attention_reference,
    normalize_positions,
    normalize_segment_ids,
)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles of the three kernels (rows of queries / keys per program or loop step).

    Untuned guesses: no GPU or TPU was available when these were chosen. Each must be a
    positive multiple of 8; the GPU (Triton) path additionally needs powers of two >= 16.
    Blocks larger than a short sequence are shrunk automatically (`dispatch.fit_block`).
    """

    block_q: int = 128  # forward: queries per program
    block_kv: int = 64  # forward: keys per inner-loop step
    block_q_dq: int = 64
    block_kv_dq: int = 64
    block_q_dkv: int = 64
    block_kv_dkv: int = 64
    block_kv_xla: int = DEFAULT_BLOCK_KV  # key chunk of implementation="xla"
    num_warps_fwd: int = 8  # GPU only (Triton)
    num_warps_bwd: int = 4  # GPU only (Triton)
    num_stages: int = 2  # GPU only (Triton)

    def __post_init__(self):
        dispatch.check_block_sizes(self)

    @classmethod
    def get_default(cls, implementation: str | None = None,
                    device_kind: str | None = None) -> BlockSizes:
        """Tiles for an implementation and the device compiled for (`device_kind`; None:
        `dispatch.target_device_kind()` for "tpu" / "gpu")."""
        return cls(**dispatch.default_blocks(implementation, device_kind, TPU_BLOCKS))

    def blocks(self) -> dict[str, int]:
        """The kernel block sizes by field name (`block_*`, without the XLA path's
        `block_kv_xla`)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name.startswith("block_") and f.name != "block_kv_xla"}


# TPU tiles per generation. The score tile's key axis is the lane axis: multiples of 128 (256
# on v6e, whose MXU is 256 wide). K/V stream block by block, so VMEM use depends on these alone
# (about 2-5 MiB each against the 16 MiB scoped default; see bench/RESULTS.md). Chosen for
# the compilers' VMEM verdicts, not measured for speed: no TPU was available to time them.
TPU_BLOCKS = {
    "": dict(block_q=512, block_kv=512, block_q_dq=512, block_kv_dq=512, block_q_dkv=512,
             block_kv_dkv=512),
    "TPU v6 lite": dict(block_q=1024, block_kv=512, block_q_dq=1024, block_kv_dq=512,
                        block_q_dkv=512, block_kv_dkv=1024),
    # Ironwood: v6e's 256-wide MXU and 32 MiB scoped limit (the compiler's verdict: "limit
    # 32.00M"), so v6e's tiles: 6.8 / 8.9 / 9.2 MiB (fwd / dq / dk/dv at N = 16, T = S = 16K;
    # the default tiles ask 3.7 / 4.9 / 5.4 MiB, all-1024 tiles up to 14.5 MiB).
    "TPU7x": dict(block_q=1024, block_kv=512, block_q_dq=1024, block_kv_dq=512,
                  block_q_dkv=512, block_kv_dkv=1024),
}


@dataclasses.dataclass(frozen=True)
class _Config:
    backend: dispatch.KernelBackend
    geometry: kernels.Geometry
    blocks: BlockSizes


def _grid(b: int, n: int, num_blocks: int):
    """Grid of the portable (GPU / interpret) kernels and its (b, n, i) unpacking:
    program_id(0) varies fastest on GPU, so the block axis goes first (neighbouring programs
    share K/V in L2)."""
    return (num_blocks, b, n), 0, lambda g0, g1, g2: (g1, g2, g0)


def _specs(unpack):
    """BlockSpec builders, each taking (rows, dim, tiled) and indexing by (b, n, i)."""

    def spec(shape, index):
        return pl.BlockSpec(shape, lambda *g: index(*unpack(*g)))

    def head(rows, d, tiled):  # per-head [B, L, N, d]: N squeezed, a strided load, no copy
        return spec((None, rows, None, d), lambda b, n, i: (b, i if tiled else 0, n, 0))

    def shared(rows, d, tiled):  # [B, L, d], one row per token for all heads
        return spec((None, rows, d), lambda b, n, i: (b, i if tiled else 0, 0))

    def stats(rows, tiled):  # [B, N, L, 1] f32 row statistics (lse, delta)
        return spec((None, None, rows, 1), lambda b, n, i: (b, n, i if tiled else 0, 0))

    def segs(q_rows, q_tiled, kv_rows, kv_tiled):  # [B, L, 1] and [B, 1, L]
        return [spec((None, q_rows, 1), lambda b, n, i: (b, i if q_tiled else 0, 0)),
                spec((None, 1, kv_rows), lambda b, n, i: (b, 0, i if kv_tiled else 0))]

    def positions(q_rows, q_tiled, kv_rows, kv_tiled):  # [T, 1] and [1, S], shared over B
        return [spec((q_rows, 1), lambda b, n, i: (i if q_tiled else 0, 0)),
                spec((1, kv_rows), lambda b, n, i: (0, i if kv_tiled else 0))]

    return head, shared, stats, segs, positions


def _in_specs(specs, g: kernels.Geometry, h: int, r: int, dv: int, q_rows: int, q_tiled: bool,
              kv_rows: int, kv_tiled: bool, backward: bool) -> list:
    """The kernels' input specs in call order: (segment ids,) (positions,) q_nope, q_pe,
    k_nope, k_pe, v, and for the backward also do, lse, delta; the query side blocked `q_rows`
    at a time (or whole), the key side `kv_rows`."""
    head, shared, stats, segs, positions = specs
    in_specs = segs(q_rows, q_tiled, kv_rows, kv_tiled) if g.has_segments else []
    if g.has_positions:
        in_specs += positions(q_rows, q_tiled, kv_rows, kv_tiled)
    in_specs += [head(q_rows, h, q_tiled), head(q_rows, r, q_tiled), head(kv_rows, h, kv_tiled),
                 shared(kv_rows, r, kv_tiled), head(kv_rows, dv, kv_tiled)]
    if backward:
        in_specs += [head(q_rows, dv, q_tiled), stats(q_rows, q_tiled), stats(q_rows, q_tiled)]
    return in_specs


def _dims(q_nope, q_pe, k_nope, v, head_major):
    b = q_nope.shape[0]
    n, t = (q_nope.shape[1], q_nope.shape[2]) if head_major else (q_nope.shape[2],
                                                                   q_nope.shape[1])
    s = k_nope.shape[2] if head_major else k_nope.shape[1]
    return b, n, t, s, q_nope.shape[-1], q_pe.shape[-1], v.shape[-1]


def _forward(cfg: _Config, q_nope, q_pe, k_nope, k_pe, v, segs, pos):
    be, g, bs = cfg.backend, cfg.geometry, cfg.blocks
    if be.head_major:
        return tpu_kernels.forward(g, bs.block_q, bs.block_kv, be.interpret(), q_nope, q_pe,
                                   k_nope, k_pe, v, segs, pos)
    b, n, t, s, h, r, dv = _dims(q_nope, q_pe, k_nope, v, be.head_major)
    bq, bk = bs.block_q, bs.block_kv
    grid, axis, unpack = _grid(b, n, t // bq)
    specs = _specs(unpack)
    head, _, stats, _, _ = specs
    in_specs = _in_specs(specs, g, h, r, dv, bq, True, s, False, backward=False)
    out_shape = [jax.ShapeDtypeStruct(q_nope.shape[:-1] + (dv,), q_nope.dtype),
                 jax.ShapeDtypeStruct((b, n, t, 1), jnp.float32)]
    out, lse = pl.pallas_call(
        functools.partial(kernels.forward_kernel, g=g, block_q=bq, block_kv=bk,
                          block_axis=axis),
        grid=grid, in_specs=in_specs, out_specs=[head(bq, dv, True), stats(bq, True)],
        out_shape=out_shape, interpret=be.interpret(), name="mla_attention_fwd",
        compiler_params=be.compiler_params(num_warps=bs.num_warps_fwd,
                                           num_stages=bs.num_stages),
    )(*(segs or ()), *(pos or ()), q_nope, q_pe, k_nope, k_pe, v)
    return out, lse


def _backward(cfg: _Config, res, do):
    be, g, bs = cfg.backend, cfg.geometry, cfg.blocks
    q_nope, q_pe, k_nope, k_pe, v, segs, pos, out, lse = res
    b, n, t, s, h, r, dv = _dims(q_nope, q_pe, k_nope, v, be.head_major)
    eq = "BNTV,BNTV->BNT" if be.head_major else "BTNV,BTNV->BNT"
    delta = jnp.einsum(eq, out.astype(jnp.float32), do.astype(jnp.float32))[..., None]
    if be.head_major:
        args = (q_nope, q_pe, k_nope, k_pe, v, segs, do, lse, delta, pos)
        dq_nope, dq_pe = tpu_kernels.dq(g, bs.block_q_dq, bs.block_kv_dq, be.interpret(), *args)
        dk_nope, dk_pe, dv_ = tpu_kernels.dkv(g, bs.block_q_dkv, bs.block_kv_dkv,
                                              be.interpret(), *args)
        return dq_nope, dq_pe, dk_nope, dk_pe, dv_, None, None
    seg_args = tuple(segs or ()) + tuple(pos or ())
    cp = be.compiler_params(num_warps=bs.num_warps_bwd, num_stages=bs.num_stages)

    bq, bk = bs.block_q_dq, bs.block_kv_dq
    grid, axis, unpack = _grid(b, n, t // bq)
    specs = _specs(unpack)
    head, _, stats, _, _ = specs
    in_specs = _in_specs(specs, g, h, r, dv, bq, True, s, False, backward=True)
    dq_nope, dq_pe = pl.pallas_call(
        functools.partial(kernels.dq_kernel, g=g, block_q=bq, block_kv=bk, block_axis=axis),
        grid=grid, in_specs=in_specs, out_specs=[head(bq, h, True), head(bq, r, True)],
        out_shape=[jax.ShapeDtypeStruct(q_nope.shape, q_nope.dtype),
                   jax.ShapeDtypeStruct(q_pe.shape, q_pe.dtype)],
        interpret=be.interpret(), name="mla_attention_dq", compiler_params=cp,
    )(*seg_args, q_nope, q_pe, k_nope, k_pe, v, do, lse, delta)

    bq, bk = bs.block_q_dkv, bs.block_kv_dkv
    grid, axis, unpack = _grid(b, n, s // bk)
    specs = _specs(unpack)
    head, _, stats, _, _ = specs
    in_specs = _in_specs(specs, g, h, r, dv, t, False, bk, True, backward=True)
    dk_pe_partial_spec = stats(bk, True)  # [B, N, S, R] f32, same indexing as stats
    dk_pe_partial_spec = pl.BlockSpec((None, None, bk, r), dk_pe_partial_spec.index_map)
    dk_nope, dk_pe_BNSR, dv_ = pl.pallas_call(
        functools.partial(kernels.dkv_kernel, g=g, block_q=bq, block_kv=bk, block_axis=axis),
        grid=grid, in_specs=in_specs,
        out_specs=[head(bk, h, True), dk_pe_partial_spec, head(bk, dv, True)],
        out_shape=[jax.ShapeDtypeStruct(k_nope.shape, k_nope.dtype),
                   jax.ShapeDtypeStruct((b, n, s, r), jnp.float32),
                   jax.ShapeDtypeStruct(v.shape, v.dtype)],
        interpret=be.interpret(), name="mla_attention_dkv", compiler_params=cp,
    )(*seg_args, q_nope, q_pe, k_nope, k_pe, v, do, lse, delta)
    dk_pe = jnp.sum(dk_pe_BNSR, axis=1).astype(k_pe.dtype)
    return dq_nope, dq_pe, dk_nope, dk_pe, dv_, None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg, q_nope, q_pe, k_nope, k_pe, v, segs, pos):
    return _forward(cfg, q_nope, q_pe, k_nope, k_pe, v, segs, pos)[0]


def _attention_fwd(cfg, q_nope, q_pe, k_nope, k_pe, v, segs, pos):
    out, lse = _forward(cfg, q_nope, q_pe, k_nope, k_pe, v, segs, pos)
    return out, (q_nope, q_pe, k_nope, k_pe, v, segs, pos, out, lse)


_attention.defvjp(_attention_fwd, _backward)


def _check_shapes(q_nope_BTNH, q_pe_BTNR, k_nope_BSNH, k_pe_BSR, v_BSNV):
    arrays = dict(q_nope_BTNH=q_nope_BTNH, q_pe_BTNR=q_pe_BTNR, k_nope_BSNH=k_nope_BSNH,
                  k_pe_BSR=k_pe_BSR, v_BSNV=v_BSNV)
    dispatch.check_named_shapes(**arrays)
    for name, x in arrays.items():
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be floating point, got {x.dtype}")


@functools.partial(jax.jit,
                   static_argnames=("sm_scale", "causal", "implementation", "block_sizes"))
def mla_attention(q_nope_BTNH: jax.Array, q_pe_BTNR: jax.Array, k_nope_BSNH: jax.Array,
                  k_pe_BSR: jax.Array, v_BSNV: jax.Array, *, sm_scale: float,
                  causal: bool = True, segment_ids: Any = None, implementation: str | None = None,
                  block_sizes: BlockSizes | None = None, q_positions: Any = None,
                  k_positions: Any = None) -> jax.Array:
    """MLA attention, differentiable in all five inputs (flash forward and backward kernels).

    Args:
      q_nope_BTNH, q_pe_BTNR: queries, nope and rope parts.
      k_nope_BSNH: per-head nope keys. k_pe_BSR: rope key shared by all heads.
      v_BSNV: per-head values.
      sm_scale: softmax scale (a Python float, static).
      causal: query t sees keys s <= S - T + t (queries are the last T positions), or with
        positions keys s with k_positions[s] <= q_positions[t].
      segment_ids: None, a pair (q_segment_ids_BT, kv_segment_ids_BS), or one [B, T] array
        when T == S; tokens attend only to keys with an equal id.
      implementation: see `pallas_kernels.dispatch` (None picks by jax.default_backend()).
      block_sizes: kernel tiles; None uses `BlockSizes.get_default(implementation)`.
      q_positions, k_positions: None, or the queries' [T] / keys' [S] global positions (ints,
        shared by the batch; one left None defaults to S - T + t / s); causal only.
    Returns:
      out_BTNV in q_nope's dtype (f32 softmax statistics and accumulation).
    """
    _check_shapes(q_nope_BTNH, q_pe_BTNR, k_nope_BSNH, k_pe_BSR, v_BSNV)
    b, t, n, _ = q_nope_BTNH.shape
    s = k_nope_BSNH.shape[1]
    segs = normalize_segment_ids(segment_ids, t, s)
    positions = normalize_positions(q_positions, k_positions, t, s, causal)
    impl = dispatch.resolve(implementation)
    bs = block_sizes or BlockSizes.get_default(impl)
    if impl == "xla":
        q_pos_T, k_pos_S = positions or (None, None)
        return mla_attention_reference(q_nope_BTNH, q_pe_BTNR, k_nope_BSNH, k_pe_BSR, v_BSNV,
                                       sm_scale=sm_scale, causal=causal, segment_ids=segs,
                                       block_kv=bs.block_kv_xla, q_positions=q_pos_T,
                                       k_positions=k_pos_S)
    backend = dispatch.KernelBackend(impl)
    fitted = {k: dispatch.fit_block(v, t if "_q" in k else s) for k, v in bs.blocks().items()}
    if backend.pow2_tiles:
        for k, v in fitted.items():
            if v != dispatch.next_pow2(v) or v < 16:
                raise ValueError(f"BlockSizes.{k}={v}: the GPU kernel needs a power of two >= 16")
    bs = dataclasses.replace(bs, **fitted)
    t_pad = dispatch.round_up(t, math.lcm(bs.block_q, bs.block_q_dq, bs.block_q_dkv))
    s_pad = dispatch.round_up(s, math.lcm(bs.block_kv, bs.block_kv_dq, bs.block_kv_dkv))
    geometry = kernels.Geometry(
        sm_scale=float(sm_scale), causal=bool(causal), offset=s - t, s_len=s,
        # Causal masking already hides padded keys from every real query.
        mask_kv_len=(s_pad != s) and not causal, has_segments=segs is not None,
        has_positions=positions is not None)
    cfg = _Config(backend=backend, geometry=geometry, blocks=bs)

    v_dim = v_BSNV.shape[-1]

    def prep(x, length, length_pad, per_head=True):
        d = x.shape[-1]
        d_pad = max(16, dispatch.next_pow2(d)) if backend.pow2_tiles else d
        widths = [(0, 0), (0, length_pad - length)] + [(0, 0)] * (x.ndim - 3) + [(0, d_pad - d)]
        x = jnp.pad(x, widths) if any(w != (0, 0) for w in widths) else x
        return jnp.einsum("BLND->BNLD", x) if per_head and backend.head_major else x

    args = (prep(q_nope_BTNH, t, t_pad), prep(q_pe_BTNR, t, t_pad),
            prep(k_nope_BSNH, s, s_pad), prep(k_pe_BSR, s, s_pad, per_head=False),
            prep(v_BSNV, s, s_pad))
    if segs is not None:
        q_seg_BT, kv_seg_BS = segs
        segs = (jnp.pad(q_seg_BT, [(0, 0), (0, t_pad - t)])[:, :, None],
                jnp.pad(kv_seg_BS, [(0, 0), (0, s_pad - s)])[:, None, :])
    pos = None
    if positions is not None:  # padded queries see nothing, padded keys are seen by none
        q_pos_T, k_pos_S = positions
        pos = (jnp.pad(q_pos_T, (0, t_pad - t), constant_values=kernels.PAD_Q_POSITION)[:, None],
               jnp.pad(k_pos_S, (0, s_pad - s), constant_values=kernels.PAD_K_POSITION)[None])
    out = _attention(cfg, *args, segs, pos)
    if backend.head_major:
        out = jnp.einsum("BNTV->BTNV", out)
    return out[:, :t, :, :v_dim]
