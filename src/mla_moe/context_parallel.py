"""Context parallelism: each sequence split over the mesh's `context` axis (C chips).

Layout (zigzag, for causal load balance): the T tokens of a sequence are cut into 2C chunks of
T / 2C; context shard i holds chunks i and 2C - 1 - i, in that order. Under a causal mask a
query's work grows with its position, so contiguous shards would leave the last shard C times
the first one's work (and the step waits for it); chunk i's early queries paired with chunk
2C - 1 - i's late ones give every shard the same count of visible (query, key) pairs.

The batch is permuted once, at the start of the train and eval steps (`zigzag_batch`):
tokens, targets, positions (RoPE keeps each token's own position), segment ids and weights,
all along T. Every per-token computation (embedding, norms, projections, MoE, losses) is
indifferent to the order of the tokens; the losses are sums over tokens. The computations
that do look along T know the layout:
  - attention (`gathered_latent_attention`): each shard's queries meet every key of the
    sequence, gathered along `context` as MLA's compressed latent [c_KV; k_pe] (C + R values
    per token; per-head keys and values would be N x (H + R + V)); the causal mask compares
    the tokens' indices in the unpermuted sequence: on XLA a key block at a time
    (key_blocks.py), or on the Pallas kernel given each query's index (`q_positions`) against
    the gathered keys put back in sequence order;
  - MTP's "token t + k" (`shift_left`): taken in the unpermuted order.

Legend: see layers.py; here C is also the context size where it says so (`context`).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mla_moe import key_blocks, sharding
from mla_moe.layers import dense

AXIS = "context"
# Keys per block of the attention loop (key_blocks.py): one block's scores are
# [B, N, T / context, KEY_BLOCK] float32 per shard.
KEY_BLOCK = 512


def num_key_blocks(length: int, block: int | None = None) -> int:
    """The fewest key blocks of at most `block` (default KEY_BLOCK) keys that split `length`
    evenly."""
    block = KEY_BLOCK if block is None else block
    j = -(-length // block)
    while length % j:
        j += 1
    return j


def context_size() -> int:
    """Size of the active mesh's `context` axis (1 without a mesh): the batch the model sees
    is in the zigzag layout when it is > 1."""
    return sharding.mesh_axis_size(AXIS)


# --- the zigzag layout --------------------------------------------------------------------------
def _chunk_order(context: int) -> np.ndarray:
    """The 2C chunk indices in layout order: 0, 2C-1, 1, 2C-2, ..., C-1, C."""
    first = np.arange(context)
    return np.stack([first, 2 * context - 1 - first], axis=1).reshape(-1)


def zigzag_indices(length: int, context: int) -> np.ndarray:
    """[T] int: the index in the sequence of the token at each slot of the zigzag layout."""
    if length % (2 * context):
        raise ValueError(f"sequence length {length} is not divisible by 2 x context={context}")
    chunk = length // (2 * context)
    return (_chunk_order(context)[:, None] * chunk + np.arange(chunk)[None, :]).reshape(-1)


def zigzag(x: jax.Array, context: int, axis: int = 1) -> jax.Array:
    """`x` with its `axis` (the sequence, length T) put in the zigzag layout."""
    if context == 1:
        return x
    return jnp.take(x, jnp.asarray(zigzag_indices(x.shape[axis], context)), axis=axis)


def unzigzag(x: jax.Array, context: int, axis: int = 1) -> jax.Array:
    """The inverse of `zigzag`: the sequence back in its own order."""
    if context == 1:
        return x
    inverse = np.argsort(zigzag_indices(x.shape[axis], context))
    return jnp.take(x, jnp.asarray(inverse), axis=axis)


def _unzigzag_gathered(x_BS: jax.Array, context: int) -> jax.Array:
    """`unzigzag` along axis 1 as whole chunks (a static reorder of 2C slices, no gather)."""
    chunk = x_BS.shape[1] // (2 * context)
    slot = np.argsort(_chunk_order(context))  # where each chunk of the sequence sits
    return jnp.concatenate([x_BS[:, k * chunk:(k + 1) * chunk] for k in slot], axis=1)


def zigzag_batch(batch: Mapping[str, jax.Array], context: int) -> dict[str, jax.Array]:
    """Every [B, T] field of a train batch in the zigzag layout (unchanged for context 1)."""
    return {k: zigzag(v, context) for k, v in batch.items()}


def shift_left(x_BT: jax.Array, k: int, fill=0) -> jax.Array:
    """x at sequence index t + k for the token at index t (`fill` past the end), in the layout
    the model sees: on a context mesh the shift is taken in the unpermuted order."""
    c = context_size()
    x_BT = unzigzag(x_BT, c)
    shifted_BT = jnp.pad(x_BT[:, k:], ((0, 0), (0, k)), constant_values=fill)
    return zigzag(shifted_BT, c)


# --- attention over the gathered latent ---------------------------------------------------------
def gathered_latent_attention(
    q_nope_BTNH: jax.Array,
    q_pe_BTNR: jax.Array,
    kv_BTL: jax.Array,
    segment_ids_BT: jax.Array | None,
    wk_b_CNH: jax.Array,
    wv_b_CNV: jax.Array,
    sm_scale: float,
    implementation: str | None = None,
) -> jax.Array:
    """Causal MLA self-attention (naive form) on a context mesh: o [B, T, N, V].

    Inputs are global arrays in the zigzag layout, T split over `context`: queries
    [B, T, N, H] / [B, T, N, R], the latent kv_BTL = [c_KV; k_pe] [B, T, C + R], segment ids
    [B, T] (None: one document per row). Per shard (`jax.shard_map`), the latent and the
    segment ids are all-gathered along `context` (the backward reduce-scatters the latent's
    gradient: the transpose of the gather), and the local queries attend over the whole
    sequence where the key's sequence index is <= the query's and the segments agree, a block
    of KEY_BLOCK keys at a time (key_blocks.py): each block's per-head keys and values are
    up-projected from its latent rows with wk_b_CNH / wv_b_CNV (heads split as the queries'),
    so memory stays linear in T per shard.

    implementation: None for that XLA loop, else the `pallas_kernels.mla_attention`
    implementation to run instead: the gathered latent is put back in sequence order and
    up-projected whole (per-head keys and values [B, T, N / tensor, H + V] per shard, as the
    kernel path without context parallelism holds them), and the kernel takes the local
    queries' sequence indices as `q_positions`, so its block skipping sees the zigzag layout.
    """
    context = context_size()
    t = kv_BTL.shape[1]
    order_T = zigzag_indices(t, context)
    dt = q_nope_BTNH.dtype
    segs = () if segment_ids_BT is None else (segment_ids_BT,)

    def body(q_nope_BtNH, q_pe_BtNR, kv_BtL, wk_b, wv_b, *seg_Bt):
        b, t_local = kv_BtL.shape[:2]
        start = jax.lax.axis_index(AXIS) * t_local
        kv_BSL = jax.lax.all_gather(kv_BtL, AXIS, axis=1, tiled=True)
        q_index_t = jax.lax.dynamic_slice_in_dim(jnp.asarray(order_T), start, t_local)
        if seg_Bt:
            q_seg_Bt = seg_Bt[0]
            k_seg_BS = jax.lax.all_gather(q_seg_Bt, AXIS, axis=1, tiled=True)
        else:
            q_seg_Bt, k_seg_BS = jnp.zeros((b, t_local), jnp.int32), jnp.zeros((b, t), jnp.int32)
        if implementation is not None:
            return _kernel_attention(q_nope_BtNH, q_pe_BtNR, kv_BSL, q_index_t,
                                     (q_seg_Bt, k_seg_BS) if seg_Bt else None, wk_b.astype(dt),
                                     wv_b.astype(dt), sm_scale, implementation, context)
        index = (q_index_t, q_seg_Bt, jnp.asarray(order_T), k_seg_BS)
        return key_blocks.latent_attention_blocked(
            q_nope_BtNH, q_pe_BtNR, kv_BSL, index, wk_b.astype(dt), wv_b.astype(dt), sm_scale,
            num_key_blocks(t))

    per_head = ("batch", "length", "act_heads", None)
    weight = (None, "act_heads", None)
    return sharding.per_shard(
        body, (q_nope_BTNH, q_pe_BTNR, kv_BTL, wk_b_CNH, wv_b_CNV, *segs),
        (per_head, per_head, ("batch", "length", None), weight, weight)
        + (("batch", "length"),) * len(segs),
        per_head, out_shapes=(*q_nope_BTNH.shape[:3], wv_b_CNV.shape[-1]))


def _kernel_attention(q_nope_BtNH, q_pe_BtNR, kv_BSL, q_index_t, segs, wk_b_CNH, wv_b_CNV,
                      sm_scale, implementation, context):
    """One shard's queries (t of them, at sequence indices q_index_t) over the gathered latent
    kv_BSL (zigzag layout) on the Pallas kernel; segs: None or (q_seg_Bt, k_seg_BS)."""
    import pallas_kernels  # the second package of this repository

    c = wk_b_CNH.shape[0]
    kv_BSL = _unzigzag_gathered(kv_BSL, context)
    k_nope_BSNH = dense(kv_BSL[..., :c], wk_b_CNH)  # 'BSC,CNH->BSNH'
    v_BSNV = dense(kv_BSL[..., :c], wv_b_CNV)  # 'BSC,CNV->BSNV'
    if segs is not None:
        segs = (segs[0], _unzigzag_gathered(segs[1], context))
    return pallas_kernels.mla_attention(
        q_nope_BtNH, q_pe_BtNR, k_nope_BSNH, kv_BSL[..., c:], v_BSNV, sm_scale=sm_scale,
        causal=True, segment_ids=segs, implementation=implementation, q_positions=q_index_t)
