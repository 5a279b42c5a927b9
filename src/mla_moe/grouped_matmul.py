"""Grouped matmul for MoE experts: rows sorted by group, each group times its own weight.

`jax.lax.ragged_dot` is the natural primitive, but XLA lowers it to a dense product over
every group on CPU (and, per reports, on GPU), so its cost grows with the number of experts.
The blocked form here pads each group to a multiple of `block` rows, then runs one
[block, D] x [D, F] product per block in a `lax.scan`: cost ~ (rows + E * block) * D * F,
independent of how many experts there are. TPU keeps `ragged_dot` (a real grouped GEMM).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def block_rows(rows: int, groups: int) -> int:
    """Block height: a power of two near a quarter of the mean group size, in [8, 128]."""
    target = max(1, rows // (4 * groups))
    return int(min(128, max(8, 1 << (target.bit_length() - 1))))


def _blocked(x_MD, w_EDF, group_sizes_E, block):
    x_MD, w_EDF = jnp.asarray(x_MD), jnp.asarray(w_EDF)  # w is indexed by a traced group id
    m, d = x_MD.shape
    e, _, f = w_EDF.shape
    sizes = group_sizes_E.astype(jnp.int32)
    padded = (sizes + block - 1) // block * block
    ends, padded_ends = jnp.cumsum(sizes), jnp.cumsum(padded)
    starts, padded_starts = ends - sizes, padded_ends - padded
    num_blocks = -(-(m + e * (block - 1)) // block)  # static bound on the padded blocks
    rows_M = jnp.arange(m)
    group_M = jnp.minimum(jnp.searchsorted(ends, rows_M, side="right"), e - 1)
    # Rows past sum(sizes) belong to no group: sent out of range (dropped), read back as 0.
    dest_M = jnp.where(rows_M < ends[-1], padded_starts[group_M] + rows_M - starts[group_M],
                       num_blocks * block)
    x_pad = jnp.zeros((num_blocks * block, d), x_MD.dtype).at[dest_M].set(x_MD, mode="drop")
    block_group = jnp.minimum(
        jnp.searchsorted(padded_ends, jnp.arange(num_blocks) * block, side="right"), e - 1
    )

    def step(_, inputs):
        x_bD, g = inputs
        return None, jnp.dot(x_bD, w_EDF[g], preferred_element_type=jnp.float32)

    _, y = jax.lax.scan(step, None, (x_pad.reshape(num_blocks, block, d), block_group))
    return y.reshape(num_blocks * block, f).at[dest_M].get(mode="fill", fill_value=0)


def grouped_matmul(x_MD: jax.Array, w_EDF: jax.Array, group_sizes_E: jax.Array, *,
                   implementation: str | None = None) -> jax.Array:
    """y[i] = x[i] @ w[group of row i] (float32), rows sorted by group; rows past
    sum(group_sizes) (<= M) are zeros, as with `ragged_dot`.

    implementation: "ragged_dot", "blocked", or None (ragged_dot on TPU, blocked elsewhere).
    """
    if implementation is None:
        implementation = "ragged_dot" if jax.default_backend() == "tpu" else "blocked"
    if implementation == "ragged_dot":
        return jax.lax.ragged_dot(x_MD, w_EDF, group_sizes_E, preferred_element_type=jnp.float32)
    if implementation != "blocked":
        raise ValueError(
            f"implementation must be 'ragged_dot' or 'blocked', got {implementation!r}")
    return _blocked(x_MD, w_EDF, group_sizes_E, block_rows(x_MD.shape[0], w_EDF.shape[0]))
