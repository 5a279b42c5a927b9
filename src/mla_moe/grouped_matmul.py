"""Grouped expert compute: rows grouped by expert, each group through its own SwiGLU.

`grouped_swiglu(x_TD, experts_TK, weights_TK, gate, up, down)` is the routed-expert core of
the MoE layer: y[t] = sum_k weights[t, k] * SwiGLU_{experts[t, k]}(x[t]).

- "blocked" (CPU, GPU): a padded layout puts each expert's rows in whole blocks of `block`
  rows; one `lax.scan` step per block gathers its rows from x, runs gate, up and down with
  its expert's weights (gate and up as one [D, 2F] operand for narrow experts) and adds the
  weighted rows into y. Cost ~ (rows + E * block / 2) x the per-row FLOPs, independent of
  how many experts there are; the blocks past the last group are skipped, and no [T*K, D]
  buffer is built. The backward (custom VJP) is one scan in the same layout that
  accumulates each expert's weight gradient in place; the routing weights' gradient reuses the
  down projection's input gradient, so no forward product is recomputed.
- "ragged_dot" (TPU): rows sorted by expert (block = 1 layout) and `lax.ragged_dot`, a real
  grouped GEMM there; XLA lowers it to a dense product over every group on CPU (and, per
  reports, on GPU), so its cost grows with the number of experts.
- "megablox" (TPU default): the same sorted rows through megablox, jax's Pallas TPU grouped
  matmul, products in the compute dtype and one custom VJP over sort, SwiGLU and unsort
  (megablox.py); `interpret=True` runs its kernels in Pallas' interpret mode on any host.
  Not inside a `shard_map` with `check_vma=True` (see `default_implementation`).

The layout of the rows grouped by expert, and the gathers that move rows into and out of
it, are expert_layout.py's.

Legend: see layers.py; O the layout's blocks, and b (this module's own letter) the rows of
one block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mla_moe import sharding
from mla_moe.expert_layout import Layout, gather_rows, layout, permute_rows
from pallas_kernels.dispatch import target_platform

# The blocked scan multiplies by gate and up as one [D, 2F] operand when 2F is at most this:
# on XLA:CPU a [128, 128] x [128, 64] product runs ~20% faster than two [.., 32] ones, while at
# 2F = 512 the fused form was ~15% slower (bench/moe_dispatch.py, F = 32 and 256).
FUSE_MAX_WIDTH = 128


def block_rows(rows: int, groups: int) -> int:
    """Block height: a power of two near half the mean group size, in [8, 128]."""
    target = max(1, rows // (2 * groups))
    return int(min(128, max(8, 1 << (target.bit_length() - 1))))


def capacity_slots(group_M: jax.Array, affinity_M: jax.Array, groups: int,
                   capacity: int) -> jax.Array:
    """Slot of each of M assignments in a buffer of `groups` x `capacity` rows (int32 [M]).

    Within its group, an assignment's rank orders the group by affinity (highest first, ties by
    assignment order); rank r < capacity goes to slot group * capacity + r, the rest are
    dropped: slot groups * capacity, one past the buffer (append a row there to catch them).
    """
    m = group_M.shape[0]
    order_M = jnp.lexsort((-affinity_M, group_M))  # by group, then best first
    group_sizes = jnp.zeros((groups,), jnp.int32).at[group_M].add(1)
    group_starts = jnp.cumsum(group_sizes) - group_sizes
    rank_sorted_M = jnp.arange(m) - group_starts[group_M[order_M]]
    rank_M = jnp.zeros((m,), jnp.int32).at[order_M].set(rank_sorted_M.astype(jnp.int32))
    return jnp.where(rank_M < capacity, group_M * capacity + rank_M, groups * capacity)


def _expert(w, g):
    """Expert g's slice of a per-expert array w [E, ...]."""
    return jax.lax.dynamic_index_in_dim(w, g, keepdims=False)


def _add_expert(acc, g, update):
    return jax.lax.dynamic_update_index_in_dim(acc, _expert(acc, g) + update, g, 0)


def _dot(a, b):
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _scan_used(step, init, lay: Layout, skip_out, per_block=(), *, operands=()):
    """Runs `step(carry, rows_b, g, *per_block_b) -> (carry, out)` over the layout's first
    `used` blocks, in a loop of that many iterations; returns (carry, the outs stacked over
    all blocks, `skip_out` past `used`), as a scan would.

    A loop bounded by `used`, not a scan over every block with a conditional that skips the
    unused ones: XLA:GPU copies a conditional's carry (the [T, D] f32 accumulator and, in the
    backward, the [E, D, F] weight-gradient ones) on every iteration, whichever branch runs.
    Inside `shard_map`, the zeros `init` and `skip_out` are marked as varying over the mesh
    axes that `operands` (every array `step` reads) vary over, as the step's results are."""
    blocks, block = lay.group_O.shape[0], lay.block
    axes = tuple(sorted(set().union(*(sharding.varying_axes(a) for a in (*operands, *lay)))))
    if axes:
        init, skip_out = jax.tree.map(lambda z: sharding.vary(z, axes), (init, skip_out))
    xs = (lay.src_M.reshape(blocks, block), lay.group_O, *per_block)
    outs = jax.tree.map(lambda z: jnp.broadcast_to(z, (blocks, *z.shape)), skip_out)

    def body(i, state):
        carry, outs = state
        carry, out = step(carry, *(jax.lax.dynamic_index_in_dim(a, i, keepdims=False)
                                   for a in xs))
        outs = jax.tree.map(lambda o, x: jax.lax.dynamic_update_index_in_dim(o, x, i, 0),
                            outs, out)
        return carry, outs

    return jax.lax.fori_loop(0, lay.used, body, (init, outs))


def _project(x_bD, ins, g):
    """x through the expert-g slices of the up-projections `ins` (gate then up, fused in one
    [E, D, 2F] array or as two [E, D, F]), as one [b, 2F] array."""
    outs = [_dot(x_bD, _expert(w, g)) for w in ins]
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=-1)


@jax.custom_vjp
def _blocked_swiglu(x_TD, weights_M, lay: Layout, ins, down_EFD):
    """sum_k w[t, k] SwiGLU_{e[t, k]}(x[t]), the gate and up weights in `ins` (see _project):
    one scan step per block of the layout, which gathers its rows from x, applies its expert
    and adds the weighted rows into y [T, D] f32. Blocks past the last group are skipped; no
    [T*K, D] buffer is ever built."""
    return _blocked_fwd(x_TD, weights_M, lay, ins, down_EFD)[0]


def _blocked_fwd(x_TD, weights_M, lay, ins, down_EFD):
    t, d = x_TD.shape
    k = weights_M.shape[0] // t
    f = down_EFD.shape[1]

    def step(y_TD, rows_b, g):
        tok_b = rows_b // k  # padding rows (== M) -> T: out of range, read as 0, dropped
        x_bD = gather_rows(x_TD, tok_b)
        au_b2F = _project(x_bD, ins, g)
        h_bF = (jax.nn.silu(au_b2F[:, :f]) * au_b2F[:, f:]).astype(x_TD.dtype)
        y_bD = _dot(h_bF, _expert(down_EFD, g)) * gather_rows(weights_M, rows_b)[:, None]
        return y_TD.at[tok_b].add(y_bD, mode="drop"), au_b2F

    y_TD, au_Ob2F = _scan_used(step, jnp.zeros((t, d), jnp.float32), lay,
                              jnp.zeros((lay.block, 2 * f), jnp.float32),
                              operands=(x_TD, weights_M, *ins, down_EFD))
    return y_TD, (x_TD, weights_M, lay, ins, down_EFD, au_Ob2F)


def _blocked_bwd(res, dy_TD):
    """The same scan backwards in one pass: dx and dw per block, dW accumulated per expert
    in place (the autodiff of the forward would add a full [E, D, F] array per block)."""
    x_TD, weights_M, lay, ins, down_EFD, au_Ob2F = res
    t, d = x_TD.shape
    k = weights_M.shape[0] // t
    f = down_EFD.shape[1]
    dt = x_TD.dtype
    cols = [(0, 2 * f)] if len(ins) == 1 else [(0, f), (f, 2 * f)]

    def step(carry, rows_b, g, au_b2F):
        dx_TD, dins, ddown = carry
        tok_b = rows_b // k
        x_bD, dy_bD = gather_rows(x_TD, tok_b), gather_rows(dy_TD, tok_b)
        w_b = gather_rows(weights_M, rows_b)
        a_bF, u_bF = au_b2F[:, :f], au_b2F[:, f:]
        sig_bF = jax.nn.sigmoid(a_bF)
        silu_bF = a_bF * sig_bF
        h_bF = (silu_bF * u_bF).astype(dt)
        down_FD = _expert(down_EFD, g)
        dhu_bF = _dot(dy_bD.astype(dt), down_FD.T)  # d(out)/dh before the routing weight
        dw_b = jnp.sum(h_bF * dhu_bF, axis=-1)
        dh_bF = dhu_bF * w_b[:, None]
        ddown = _add_expert(ddown, g, _dot(h_bF.T, (dy_bD * w_b[:, None]).astype(dt)))
        dau_b2F = jnp.concatenate([dh_bF * u_bF * sig_bF * (1 + a_bF * (1 - sig_bF)),
                                  dh_bF * silu_bF], axis=-1).astype(dt)
        dau = [dau_b2F[:, lo:hi] for lo, hi in cols]  # one per operand in `ins`
        dins = tuple(_add_expert(acc, g, _dot(x_bD.T, da)) for acc, da in zip(dins, dau))
        dx_bD = sum(_dot(da, _expert(w, g).T) for da, w in zip(dau, ins))
        return (dx_TD.at[tok_b].add(dx_bD, mode="drop"), dins, ddown), dw_b

    init = (jnp.zeros((t, d), jnp.float32),
            tuple(jnp.zeros(w.shape, jnp.float32) for w in ins),
            jnp.zeros(down_EFD.shape, jnp.float32))
    (dx_TD, dins, ddown), dw_Ob = _scan_used(
        step, init, lay, jnp.zeros((lay.block,), jnp.float32), (au_Ob2F,),
        operands=(x_TD, dy_TD, weights_M, *ins, down_EFD, au_Ob2F))
    dweights_M = gather_rows(dw_Ob.reshape(-1), lay.dest_M)
    dx_TD, dweights_M, ddown = (sharding.cotangent_like(ct, p) for ct, p in
                                zip((dx_TD, dweights_M, ddown), (x_TD, weights_M, down_EFD)))
    dins = tuple(sharding.cotangent_like(ct, p) for ct, p in zip(dins, ins))
    return dx_TD, dweights_M, None, dins, ddown


_blocked_swiglu.defvjp(_blocked_fwd, _blocked_bwd)


def _ragged_swiglu(x_TD, weights_M, lay: Layout, gate_EDF, up_EDF, down_EFD):
    """The same with `ragged_dot` over rows sorted by expert (block = 1 layout)."""
    t, d = x_TD.shape
    k = weights_M.shape[0] // t
    x_MD = jnp.broadcast_to(x_TD[:, None, :], (t, k, d)).reshape(t * k, d)
    xs_MD = permute_rows(x_MD, lay.src_M, lay.dest_M)

    # Products come out in the activation dtype (the MXU accumulates in f32 regardless): f32
    # [rows, D] outputs and their cotangents were the largest buffers of an expert-parallel
    # V3 step. SiLU and the gating product run in f32.
    def rdot(a, w):
        return jax.lax.ragged_dot(a, w, lay.sizes_E, preferred_element_type=xs_MD.dtype)

    f32 = jnp.float32
    hs_MF = jax.nn.silu(rdot(xs_MD, gate_EDF).astype(f32)) * rdot(xs_MD, up_EDF).astype(f32)
    ys_MD = rdot(hs_MF.astype(xs_MD.dtype), down_EFD)
    y_TKD = permute_rows(ys_MD, lay.dest_M, lay.src_M).reshape(t, k, d)
    if k == 1:  # elementwise, so that XLA fuses it with the producer and any later cast
        return y_TKD[:, 0].astype(f32) * weights_M[:, None]
    return jnp.einsum("TKD,TK->TD", y_TKD, weights_M.reshape(t, k),
                      preferred_element_type=f32)


IMPLEMENTATIONS = ("blocked", "ragged_dot", "megablox")


def default_implementation(*operands: jax.Array) -> str:
    """"megablox" when compiling for TPU, else "blocked"; "ragged_dot" on TPU inside a
    `shard_map` that checks varying axes (some operand varies over a mesh axis), where
    megablox's `pallas_call` cannot state its outputs' varying axes and is rejected.

    At DeepSeek-V3 expert shapes (D = 7168, F = 2048, 32 local experts, bf16) megablox's
    forward + backward needs about half of ragged_dot's temporaries on v5p and v6e
    (tests/test_aot_megablox.py)."""
    if target_platform() != "tpu":
        return "blocked"
    return "ragged_dot" if any(sharding.varying_axes(a) for a in operands) else "megablox"


def grouped_swiglu(x_TD: jax.Array, experts_TK: jax.Array, weights_TK: jax.Array | None,
                   gate_EDF: jax.Array, up_EDF: jax.Array, down_EFD: jax.Array, *,
                   implementation: str | None = None,
                   fuse_gate_up: bool | None = None, interpret: bool = False,
                   tiling: tuple[int, int, int] | None = None) -> jax.Array:
    """y[t] = sum_k weights[t, k] * SwiGLU of x[t] by expert experts_TK[t, k], [T, D] float32.

    An expert id of E means no expert (contributes 0); each row's K experts must be
    distinct; weights_TK=None means all ones.
    implementation: one of IMPLEMENTATIONS, or None (`default_implementation`).
    fuse_gate_up: blocked only; multiply by gate and up as one [D, 2F] operand (one copy of
      both per call). None: when 2F <= FUSE_MAX_WIDTH.
    interpret, tiling: megablox only; run its kernels in Pallas' interpret mode; its (rows,
      contraction, columns) tiles (None: `megablox.default_tiling`).
    """
    implementation = implementation or default_implementation(x_TD, gate_EDF)
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    t, k = experts_TK.shape
    e = gate_EDF.shape[0]
    if weights_TK is None:
        weights_TK = jnp.ones((t, k), jnp.float32)
    weights_M = weights_TK.astype(jnp.float32).reshape(t * k)
    block = block_rows(t * k, e) if implementation == "blocked" else 1
    lay = layout(experts_TK, e, block)
    if implementation == "ragged_dot":
        return _ragged_swiglu(x_TD, weights_M, lay, gate_EDF, up_EDF, down_EFD)
    if implementation == "megablox":
        from mla_moe.megablox import megablox_swiglu  # Pallas TPU modules: loaded when used

        return megablox_swiglu(x_TD, weights_M, lay, gate_EDF, up_EDF, down_EFD,
                               tiling=tiling, interpret=interpret)
    if fuse_gate_up is None:
        fuse_gate_up = 2 * gate_EDF.shape[-1] <= FUSE_MAX_WIDTH
    ins = ((jnp.concatenate([gate_EDF, up_EDF], axis=-1),) if fuse_gate_up
           else (gate_EDF, up_EDF))
    return _blocked_swiglu(x_TD, weights_M, lay, ins, down_EFD)
