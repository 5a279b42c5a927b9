"""The grouped SwiGLU on megablox with the experts' weights gathered a chunk at a time, over
rows sorted by expert once per layer.

Under pure FSDP (mesh.expert = 1, the V3 preset) a shard runs its own M = T*K assignments
through all E experts, whose weights are split over the FSDP axes on D and all-gathered inside
the layer `chunk` experts at a time (V3's 256 experts are 22.5 GB of bf16 per layer; 32 of
them are 2.8 GB). The rows are put in expert order once: chunk j's experts are the groups
[j*chunk, (j+1)*chunk) of that one order, and megablox's `group_offset` runs the products over
those groups' row tiles only, writing into the layer's single output buffer
(`existing_out`, aliased in place). Nothing of size [P, .] is gathered, masked or summed per
chunk; that is done once per layer.

Forward, P sorted rows (M padded to megablox's row tile):
    xs_PD = x's rows in expert order
    for each chunk j: GU_j = gather(gate_j | up_j) [c, D, 2F];  au[rows of j] = xs @ GU_j
    h_PF = silu(a) * u
    for each chunk j: DN_j = gather(down_j) [c, F, D];         ys[rows of j] = h @ DN_j
    y_TD = sum_k w[t, k] ys[row of (t, k)]
Backward (the custom VJP), with g_PD = dy's rows in expert order:
    for each chunk j: DN_j again; dhu[rows of j] = g @ DN_j^T;  dDN_j = (h w)^T g over j's rows
    da, du from dhu (SwiGLU's derivative) as one [P, 2F] array dau
    for each chunk j: GU_j again; dxs[rows of j] = dau @ GU_j^T; dGU_j = xs^T dau over j's rows
    dx_TD = sum_k dxs[row of (t, k)]
Each chunk's weight gradient is reduce-scattered over the FSDP axes as soon as it is made
(the transpose of its gather), so one chunk's gradient exists unsharded at a time; both in two
stages where one would not stay an all-gather (sharding/staged.py). Gate and
up travel as one [c, D, 2F] array: one gather, one product and, for dx, one transposed product
(dau @ [gate | up]^T = da @ gate^T + du @ up^T).

Legend: see layers.py; P sorted rows, c the chunk's experts, J = E / c chunks.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mla_moe.expert_layout import gather_rows, layout
from mla_moe.megablox import (
    Tiling,
    _kernel_precision,
    _mb,
    _unsort_sum,  # reads static.k, which this module's _Static has too
    default_tiling,
    sorted_slots,
)
from mla_moe.sharding import staged


class _Static(NamedTuple):
    chunk: int  # experts per gathered chunk
    d_axes: tuple[str, ...]  # the FSDP axes that split the weights' D ((): whole)
    tiling: Tiling
    interpret: bool
    k: int  # assignments per token


def chunked_megablox_swiglu(x_TD: jax.Array, experts_TK: jax.Array, weights_TK: jax.Array,
                            gate_EDF: jax.Array, up_EDF: jax.Array, down_EFD: jax.Array, *,
                            chunk: int, d_axes: tuple[str, ...] = (),
                            tiling: Tiling | None = None, interpret: bool = False) -> jax.Array:
    """sum_k weights[t, k] SwiGLU_{experts[t, k]}(x[t]), [T, D] float32.

    experts_TK: local expert ids in [0, E], E meaning no expert; each row's ids distinct.
    gate/up [E, D', F], down [E, F, D']: D' = D / (product of `d_axes`), gathered to D inside
    (call under a shard_map holding those axes). chunk: experts gathered at once, dividing E
    (E: one gather). interpret: Pallas interpret mode (any host).
    """
    if x_TD.dtype not in (jnp.bfloat16, jnp.float32):
        raise ValueError(f"megablox takes bfloat16 or float32 inputs, got {x_TD.dtype}")
    t, k = experts_TK.shape
    e = gate_EDF.shape[0]
    if chunk <= 0 or e % chunk:
        raise ValueError(f"chunk={chunk} must divide the {e} experts")
    tiling = Tiling(*tiling) if tiling is not None else default_tiling()
    lay = layout(experts_TK, e, 1)
    src_P, dest_M = sorted_slots(lay, tiling.tm)
    static = _Static(chunk, tuple(d_axes), tiling, interpret, k)
    weights_M = weights_TK.astype(jnp.float32).reshape(t * k)
    return _swiglu(static, x_TD, weights_M, src_P, dest_M, lay.sizes_E.astype(jnp.int32),
                   gate_EDF, up_EDF, down_EFD)


def _chunks(static: _Static, w):
    """w [E, ...] as [J, c, ...]."""
    return w.reshape(w.shape[0] // static.chunk, static.chunk, *w.shape[1:])


def _gather(static: _Static, w, axis):
    return staged.all_gather(w, static.d_axes, axis)


def _scatter(static: _Static, g, axis):
    return staged.psum_scatter(g, static.d_axes, axis)


def _gmm(static: _Static, lhs, rhs, sizes_E, j, out, transpose_rhs=False):
    """out with the rows of chunk j's groups set to lhs @ rhs[group] (rhs [c, k, n], or
    [c, n, k] transposed); every other row of `out` is kept."""
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tiles = static.tiling.fit(lhs.shape[1], n, lhs.dtype)
    with _kernel_precision(lhs.dtype):
        return _mb.gmm(lhs, rhs.astype(lhs.dtype), sizes_E, out.dtype, tiles,
                       group_offset=j * static.chunk, existing_out=out,
                       transpose_rhs=transpose_rhs, interpret=static.interpret)


def _tgmm(static: _Static, lhs_PK, rhs_PN, sizes_E, j, dtype):
    """Per expert e of chunk j: lhs[rows of e].T @ rhs[rows of e], [c, K, N] in `dtype`."""
    tiles = static.tiling.fit(lhs_PK.shape[1], rhs_PN.shape[1], lhs_PK.dtype)
    with _kernel_precision(lhs_PK.dtype):
        return _mb.tgmm(lhs_PK.T, rhs_PN, sizes_E, dtype, tiles, group_offset=j * static.chunk,
                        num_actual_groups=static.chunk, interpret=static.interpret)


def _fused_gate_up(static: _Static, gate_jcDF, up_jcDF):
    """Chunk j's gate | up, gathered: [c, D, 2F]."""
    return _gather(static, jnp.concatenate([gate_jcDF, up_jcDF], axis=-1), 1)


def _rows(static, a_TD, src_P):
    """a's rows in expert order, [P, D] (0 on padding)."""
    return gather_rows(a_TD, src_P // static.k)


def _gate_up_products(static, xs_PD, sizes_E, gate_EDF, up_EDF):
    """[xs @ gate | xs @ up] of every sorted row, [P, 2F] in x's dtype (0 on padding)."""
    f = gate_EDF.shape[-1]

    def step(au_P2F, inputs):
        j, gate_j, up_j = inputs
        return _gmm(static, xs_PD, _fused_gate_up(static, gate_j, up_j), sizes_E, j,
                    au_P2F), None

    au0 = jnp.zeros((xs_PD.shape[0], 2 * f), xs_PD.dtype)
    n = gate_EDF.shape[0] // static.chunk
    au_P2F, _ = jax.lax.scan(step, au0, (jnp.arange(n, dtype=jnp.int32),
                                         _chunks(static, gate_EDF), _chunks(static, up_EDF)))
    return au_P2F


def _swiglu_of(au_P2F):
    f = au_P2F.shape[-1] // 2
    a, u = au_P2F[:, :f].astype(jnp.float32), au_P2F[:, f:].astype(jnp.float32)
    return a, u


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _swiglu(static, x_TD, weights_M, src_P, dest_M, sizes_E, gate_EDF, up_EDF, down_EFD):
    return _swiglu_fwd(static, x_TD, weights_M, src_P, dest_M, sizes_E, gate_EDF, up_EDF,
                       down_EFD)[0]


def _swiglu_fwd(static, x_TD, weights_M, src_P, dest_M, sizes_E, gate_EDF, up_EDF, down_EFD):
    xs_PD = _rows(static, x_TD, src_P)
    au_P2F = _gate_up_products(static, xs_PD, sizes_E, gate_EDF, up_EDF)
    a, u = _swiglu_of(au_P2F)
    h_PF = (jax.nn.silu(a) * u).astype(x_TD.dtype)

    def step(ys_PD, inputs):
        j, down_j = inputs
        return _gmm(static, h_PF, _gather(static, down_j, 2), sizes_E, j, ys_PD), None

    n = down_EFD.shape[0] // static.chunk
    ys0 = jnp.zeros((h_PF.shape[0], x_TD.shape[-1]), x_TD.dtype)
    ys_PD, _ = jax.lax.scan(step, ys0, (jnp.arange(n, dtype=jnp.int32),
                                        _chunks(static, down_EFD)))
    y_TD = _unsort_sum(static, ys_PD, dest_M, weights_M)
    return y_TD, (x_TD, weights_M, src_P, dest_M, sizes_E, gate_EDF, up_EDF, down_EFD, au_P2F)


def _swiglu_bwd(static, res, dy_TD):
    x_TD, weights_M, src_P, dest_M, sizes_E, gate_EDF, up_EDF, down_EFD, au_P2F = res
    dt = x_TD.dtype
    n = gate_EDF.shape[0] // static.chunk
    js = jnp.arange(n, dtype=jnp.int32)
    w_P1 = gather_rows(weights_M, src_P)[:, None]  # 0 on padding
    g_PD = _rows(static, dy_TD.astype(dt), src_P)
    a, u = _swiglu_of(au_P2F)
    sig = jax.nn.sigmoid(a)
    silu = a * sig
    h = silu * u
    hw_PF = (h * w_P1).astype(dt)

    def down_step(dhu_PF, inputs):
        j, down_j = inputs
        dn_cFD = _gather(static, down_j, 2)
        # d(out)/dh before the routing weight: g @ down[e].T (down [c, F, D] is rhs [c, n, k])
        dhu_PF = _gmm(static, g_PD, dn_cFD, sizes_E, j, dhu_PF, transpose_rhs=True)
        ddown_j = _tgmm(static, hw_PF, g_PD, sizes_E, j, down_EFD.dtype)
        return dhu_PF, _scatter(static, ddown_j, 2)

    dhu0 = jnp.zeros(hw_PF.shape, dt)
    dhu_PF, ddown_JcFD = jax.lax.scan(down_step, dhu0, (js, _chunks(static, down_EFD)))
    dhu = dhu_PF.astype(jnp.float32)
    dweights_M = gather_rows(jnp.sum(h.astype(dt).astype(jnp.float32) * dhu, axis=-1), dest_M)
    dh = dhu * w_P1
    dau_P2F = jnp.concatenate([dh * u * sig * (1 + a * (1 - sig)), dh * silu],
                              axis=-1).astype(dt)
    xs_PD = _rows(static, x_TD, src_P)
    f = gate_EDF.shape[-1]

    def gate_up_step(dxs_PD, inputs):
        j, gate_j, up_j = inputs
        gu_cD2F = _fused_gate_up(static, gate_j, up_j)
        # dau @ [gate | up]^T: [gate | up] [c, D, 2F] is rhs [c, n, k]
        dxs_PD = _gmm(static, dau_P2F, gu_cD2F, sizes_E, j, dxs_PD, transpose_rhs=True)
        dgu_cD2F = _scatter(static, _tgmm(static, xs_PD, dau_P2F, sizes_E, j, gate_EDF.dtype), 1)
        return dxs_PD, (dgu_cD2F[..., :f], dgu_cD2F[..., f:].astype(up_EDF.dtype))

    dxs0 = jnp.zeros(xs_PD.shape, dt)
    dxs_PD, (dgate, dup) = jax.lax.scan(
        gate_up_step, dxs0, (js, _chunks(static, gate_EDF), _chunks(static, up_EDF)))
    dx_TD = _unsort_sum(static, dxs_PD, dest_M).astype(x_TD.dtype)
    return (dx_TD, dweights_M, None, None, None, dgate.reshape(gate_EDF.shape),
            dup.reshape(up_EDF.shape), ddown_JcFD.reshape(down_EFD.shape))


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)
