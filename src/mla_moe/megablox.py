"""The grouped SwiGLU on megablox, jax's Pallas TPU grouped matmul (`gmm` / `tgmm`).

`megablox_swiglu(x_TD, weights_M, lay, gate, up, down)` computes what `grouped_swiglu` does
(y[t] = sum_k w[t, k] SwiGLU_{e[t, k]}(x[t]), [T, D] float32) over the rows sorted by expert
(the block = 1 `Layout`), P of them: the M = T*K assignments padded to a multiple of the row
tile, which megablox needs.

- Every grouped product comes out of the kernel in the compute dtype (bf16 for a bf16 model;
  the kernel accumulates in f32 VMEM): no f32 [P, D] or [P, F] buffer, which is what
  `lax.ragged_dot` (f32 outputs, then a cast) leaves at V3 scale.
- One `jax.custom_vjp` covers the gather into expert order, the three products, the SwiGLU
  and the weighted gather-sum back. Its backward is megablox's own: `gmm` with the weights
  transposed for the input gradients, `tgmm` for the per-expert weight gradients (written
  per expert in the weights' dtype), and gathers for the sort and unsort, so autodiff builds
  no scatter-add transposes nor f32 [P, D] cotangents. Forward residuals: the gate and up
  products ([P, F] each, compute dtype); x's sorted rows are gathered again.
- Rows past the last group (the tile padding, and the rows of assignments with no expert)
  are never written by the kernel; they are masked to 0 before anything reads them.

P rows, F hidden, D model dim; the tiles (tm, tk, tn) follow megablox (rows, contraction,
output columns).
"""

from __future__ import annotations

import functools
import importlib
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mla_moe import sharding
from mla_moe.expert_layout import Layout, gather_rows
from pallas_kernels.dispatch import per_device, round_up, target_device_kind

# (tm, tk, tn) per TPU kind. At V3 expert shapes (D = 7168, F = 2048, bf16) these compile for
# v5p and v6e within the scoped VMEM limit (tests/test_aot_megablox.py); tm = 512 keeps the
# extra tiles of groups that start mid-tile (at most one per expert) small against P / tm.
TILES = {"": (512, 1024, 1024)}

# The kernels' module (the package re-exports `ops.gmm`, the custom_vjp, under the same name).
_mb = importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")


class Tiling(NamedTuple):
    """Row, contraction and output-column tile of every product (clipped to the operands)."""

    tm: int
    tk: int
    tn: int

    def fit(self, k: int, n: int, dtype) -> tuple[int, int, int]:
        """The tiles for one [P, k] x [k, n] product: tk and tn no larger than k and n, and
        halved for f32 operands (the bf16 tiles' bytes: the same VMEM)."""
        shrink = 2 if jnp.dtype(dtype).itemsize > 2 else 1
        return self.tm, min(self.tk // shrink, k), min(self.tn // shrink, n)


def default_tiling() -> Tiling:
    """The tiles for the TPU kind being compiled for (`target_device_kind`)."""
    return Tiling(*per_device(TILES, target_device_kind()))


class _Static(NamedTuple):
    tiling: Tiling
    interpret: bool
    k: int  # assignments per token


def megablox_swiglu(x_TD: jax.Array, weights_M: jax.Array, lay: Layout, gate_EDF: jax.Array,
                    up_EDF: jax.Array, down_EFD: jax.Array, *, tiling: Tiling | None = None,
                    interpret: bool = False) -> jax.Array:
    """sum_k weights[t, k] SwiGLU_{e[t, k]}(x[t]) with megablox, [T, D] float32.

    x_TD: bf16 or f32 (the compute dtype; megablox takes no other); weights_M: [T*K] f32;
    lay: the block = 1 layout of the T*K assignments (`layout(experts_TK, E, 1)`); gate/up
    [E, D, F], down [E, F, D], cast to x's dtype if they differ. interpret: run the kernels in
    Pallas' interpret mode (CPU tests).
    """
    if lay.block != 1:
        raise ValueError(f"megablox_swiglu needs the sorted (block = 1) layout, got {lay.block=}")
    if x_TD.dtype not in (jnp.bfloat16, jnp.float32):
        raise ValueError(f"megablox takes bfloat16 or float32 inputs, got {x_TD.dtype}")
    varying = set().union(*(sharding.varying_axes(a)
                            for a in (x_TD, weights_M, gate_EDF, up_EDF, down_EFD)))
    if varying:
        raise ValueError(
            f"megablox_swiglu inside a shard_map with check_vma=True (operands vary over "
            f"{sorted(varying)}): megablox's pallas_call does not declare its outputs' varying "
            "axes; use check_vma=False there, or implementation='ragged_dot'")
    t = x_TD.shape[0]
    m = weights_M.shape[0]
    tiling = Tiling(*tiling) if tiling is not None else default_tiling()
    src_P, dest_M = sorted_slots(lay, tiling.tm)
    static = _Static(tiling, interpret, m // t)
    return _swiglu(static, x_TD, weights_M, src_P, dest_M, lay.sizes_E.astype(jnp.int32),
                   gate_EDF, up_EDF, down_EFD)


def sorted_slots(lay: Layout, tm: int) -> tuple[jax.Array, jax.Array]:
    """(src_P, dest_M) of the block = 1 layout padded to P = a multiple of the row tile tm:
    sorted row i reads assignment src_P[i] (M: padding); assignment j is sorted row dest_M[j]
    (P, out of range, for an assignment with no expert)."""
    m = lay.dest_M.shape[0]
    p = round_up(m, tm)
    src_P = jnp.concatenate([lay.src_M, jnp.full((p - m,), m, jnp.int32)])
    return src_P, jnp.where(lay.dest_M < m, lay.dest_M, p)


def _gmm(static: _Static, lhs, rhs, sizes_E, transpose_rhs=False):
    """Grouped lhs [P, k] @ rhs[e] ([E, k, n], or [E, n, k] transposed), in lhs's dtype."""
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tiles = static.tiling.fit(lhs.shape[1], n, lhs.dtype)
    with _kernel_precision(lhs.dtype):
        return _mb.gmm(lhs, rhs.astype(lhs.dtype), sizes_E, lhs.dtype, tiles,
                       transpose_rhs=transpose_rhs, interpret=static.interpret)


def _tgmm(static: _Static, lhs_PK, rhs_PN, sizes_E, dtype):
    """Per expert e: lhs[rows of e].T @ rhs[rows of e], [E, K, N] in `dtype`."""
    tiles = static.tiling.fit(lhs_PK.shape[1], rhs_PN.shape[1], lhs_PK.dtype)
    with _kernel_precision(lhs_PK.dtype):
        return _mb.tgmm(lhs_PK.T, rhs_PN, sizes_E, dtype, tiles, interpret=static.interpret)


def _kernel_precision(dtype):
    """bf16 operands get the default precision: a process-wide "highest" would ask Mosaic for
    an f32 contraction of bf16 operands, which it rejects (see `kernel_dot`)."""
    return jax.default_matmul_precision("default" if dtype == jnp.bfloat16 else "highest")


def _sorted_inputs(static, x_TD, weights_M, src_P, sizes_E):
    """x's rows in expert order [P, D], their routing weights [P] f32 (0 on padding) and the
    mask of rows inside a group [P, 1]."""
    xs_PD = gather_rows(x_TD, src_P // static.k)  # padding (m) -> token T: out of range, 0
    w_P = gather_rows(weights_M, src_P)
    valid_P1 = (jnp.arange(src_P.shape[0]) < jnp.sum(sizes_E))[:, None]
    return xs_PD, w_P, valid_P1


def _unsort_sum(static, ys_PD, dest_M, weights_M=None):
    """sum over each token's k sorted rows (times their routing weights), [T, D] f32."""
    k = static.k
    y_TKD = gather_rows(ys_PD, dest_M).reshape(-1, k, ys_PD.shape[-1])
    if weights_M is None:
        return jnp.sum(y_TKD, axis=1, dtype=jnp.float32)
    return jnp.einsum("TKD,TK->TD", y_TKD, weights_M.reshape(-1, k),
                      preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _swiglu(static, x_TD, weights_M, src_P, dest_M, sizes_E, gate_EDF, up_EDF, down_EFD):
    return _swiglu_fwd(static, x_TD, weights_M, src_P, dest_M, sizes_E, gate_EDF, up_EDF,
                       down_EFD)[0]


def _swiglu_fwd(static, x_TD, weights_M, src_P, dest_M, sizes_E, gate_EDF, up_EDF, down_EFD):
    xs_PD, _, valid_P1 = _sorted_inputs(static, x_TD, weights_M, src_P, sizes_E)
    a_PF = jnp.where(valid_P1, _gmm(static, xs_PD, gate_EDF, sizes_E), 0)
    u_PF = jnp.where(valid_P1, _gmm(static, xs_PD, up_EDF, sizes_E), 0)
    f32 = jnp.float32
    h_PF = (jax.nn.silu(a_PF.astype(f32)) * u_PF.astype(f32)).astype(x_TD.dtype)
    ys_PD = _gmm(static, h_PF, down_EFD, sizes_E)  # rows past the groups: never read
    y_TD = _unsort_sum(static, ys_PD, dest_M, weights_M)
    return y_TD, (x_TD, weights_M, src_P, dest_M, sizes_E, gate_EDF, up_EDF, down_EFD,
                  a_PF, u_PF)


def _swiglu_bwd(static, res, dy_TD):
    x_TD, weights_M, src_P, dest_M, sizes_E, gate_EDF, up_EDF, down_EFD, a_PF, u_PF = res
    dt = x_TD.dtype
    f32 = jnp.float32
    xs_PD, w_P, valid_P1 = _sorted_inputs(static, x_TD, weights_M, src_P, sizes_E)
    g_PD = gather_rows(dy_TD.astype(dt), src_P // static.k)  # dy of each sorted row's token
    # d(out)/dh before the routing weight: g @ down[e].T (down [E, F, D] is rhs [E, n, k]).
    dhu_PF = jnp.where(valid_P1, _gmm(static, g_PD, down_EFD, sizes_E, transpose_rhs=True), 0)
    a, u = a_PF.astype(f32), u_PF.astype(f32)
    sig = jax.nn.sigmoid(a)
    silu = a * sig
    h = silu * u
    dhu = dhu_PF.astype(f32)
    dweights_M = gather_rows(jnp.sum(h.astype(dt).astype(f32) * dhu, axis=-1), dest_M)
    dh = dhu * w_P[:, None]
    ddown = _tgmm(static, (h * w_P[:, None]).astype(dt), g_PD, sizes_E, down_EFD.dtype)
    da_PF = (dh * u * sig * (1 + a * (1 - sig))).astype(dt)
    du_PF = (dh * silu).astype(dt)
    dgate = _tgmm(static, xs_PD, da_PF, sizes_E, gate_EDF.dtype)
    dup = _tgmm(static, xs_PD, du_PF, sizes_E, up_EDF.dtype)
    dx_TD = (_unsort_sum(static, _gmm(static, da_PF, gate_EDF, sizes_E, transpose_rhs=True),
                         dest_M)
             + _unsort_sum(static, _gmm(static, du_PF, up_EDF, sizes_E, transpose_rhs=True),
                           dest_M))
    like = sharding.cotangent_like
    return (like(dx_TD, x_TD), like(dweights_M, weights_M), None, None, None,
            like(dgate, gate_EDF), like(dup, up_EDF), like(ddown, down_EFD))


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)
