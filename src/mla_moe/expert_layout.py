"""Rows grouped by expert: the layout of the M = T*K (token, expert) assignments that the
grouped SwiGLU implementations share (grouped_matmul.py, megablox.py), and moving rows into
and out of it.

The layout comes from a cumulative count over [T, E], not a sort; moving rows into and out of
the sorted order is a pair of gathers whose transposes are the inverse gathers
(`permute_rows`), never a scatter.

Legend: see layers.py; O the layout's blocks, and b (this module's own letter) the rows of
one block.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Layout(NamedTuple):
    """Where the M = T*K rows (t, k) go in a buffer of O blocks of `block` rows grouped by
    expert, each group padded to a multiple of `block` (block = 1: sorted, no padding). The
    buffer's slots are the M rows spread over whole blocks: O * block >= M of them."""

    dest_M: jax.Array  # [M] slot of each row; O * block for rows with no expert
    src_M: jax.Array  # [O * block] row of each slot; M for padding
    sizes_E: jax.Array  # [E] rows per expert
    group_O: jax.Array  # [O] expert of each block
    used: jax.Array  # () blocks holding rows; the rest of the O are padding

    @property
    def block(self) -> int:
        """Rows per block."""
        return self.src_M.shape[0] // self.group_O.shape[0]


def layout(experts_TK: jax.Array, groups: int, block: int) -> Layout:
    """The grouped layout of rows (t, k) with expert experts_TK[t, k] (== `groups`: none).

    Each row's K experts must be distinct (top-k), so a row's rank within its expert is the
    count of earlier rows t' < t holding that expert. Within an expert, rows keep (t, k) order.
    """
    t, k = experts_TK.shape
    m = t * k
    e_TK = experts_TK.astype(jnp.int32)
    held_TE = (e_TK[:, :, None] == jnp.arange(groups, dtype=jnp.int32)).sum(1, dtype=jnp.int32)
    count_TE = jnp.cumsum(held_TE, axis=0)
    sizes_E = count_TE[-1]
    valid_TK = e_TK < groups
    e_safe_TK = jnp.where(valid_TK, e_TK, 0)
    rank_TK = jnp.take_along_axis(count_TE, e_safe_TK, axis=1) - 1
    padded_E = (sizes_E + block - 1) // block * block
    padded_ends_E = jnp.cumsum(padded_E)
    num_blocks = -(-(m + groups * (block - 1)) // block)  # static bound on the padded blocks
    slots = num_blocks * block
    dest_M = (
        jnp.where(valid_TK, padded_ends_E[e_safe_TK] - padded_E[e_safe_TK] + rank_TK, slots)
        .reshape(m)
        .astype(jnp.int32)
    )
    src_M = (
        jnp.full((slots,), m, jnp.int32).at[dest_M].set(jnp.arange(m, dtype=jnp.int32), mode="drop")
    )
    group_O = jnp.minimum(
        jnp.searchsorted(padded_ends_E, jnp.arange(num_blocks) * block, side="right"), groups - 1
    ).astype(jnp.int32)
    return Layout(dest_M, src_M, sizes_E, group_O, padded_ends_E[-1] // block)


def gather_rows(a: jax.Array, idx: jax.Array) -> jax.Array:
    """Rows idx of a; rows past the end (padding / no row) read as 0."""
    return a.at[idx].get(mode="fill", fill_value=0)


@jax.custom_vjp
def permute_rows(x: jax.Array, idx: jax.Array, inv: jax.Array) -> jax.Array:
    """y[i] = x[idx[i]] (0 where idx[i] is out of range), for `idx` and `inv` mutually
    inverse partial bijections; the gradient is the inverse gather g[inv[j]]. x: [rows, ...];
    idx: [rows out] int; inv: [rows] int."""
    return gather_rows(x, idx)


def _permute_fwd(x, idx, inv):
    return permute_rows(x, idx, inv), (idx, inv)


def _permute_bwd(res, ct):
    idx, inv = res
    return gather_rows(ct, inv), None, None


permute_rows.defvjp(_permute_fwd, _permute_bwd)
