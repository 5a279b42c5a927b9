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
  - V3.2's sparse attention (`indexed_latent_attention`): the indexer's key (d values per
    token) is gathered with the latent, and each shard's queries score every key they see,
    take their top-k (a shard's own queries' top-k needs no other shard's), attend to it and
    compute the indexer's KL, all on local queries x the gathered keys (dsa_blocked.py, told
    the queries' sequence indices), so memory stays linear in T per shard;
  - MTP's "token t + k" (`shift_left`): taken in the unpermuted order.

Legend: see layers.py; here C is also the context size where it says so (`context`); t the
tokens of one shard (T / context); as in indexer.py, n the indexer heads, d the indexer head
dim and K the selected keys per query.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mla_moe import dsa_blocked, key_blocks, sharding
from mla_moe.config import ModelConfig
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
    segment ids are all-gathered along `context` and put in sequence order (the backward
    reduce-scatters the latent's gradient: the transpose of the gather), and the local queries
    attend over the whole sequence where the key's sequence index is <= the query's and the
    segments agree, a block of KEY_BLOCK keys at a time (key_blocks.py): each block's per-head
    keys and values are up-projected from its latent rows with wk_b_CNH / wv_b_CNV (heads split
    as the queries'), so memory stays linear in T per shard.

    implementation: None for that XLA loop, else the `pallas_kernels.mla_attention`
    implementation to run instead: the gathered latent is up-projected whole (per-head keys
    and values [B, T, N / tensor, H + V] per shard, as the kernel path without context
    parallelism holds them), and the kernel takes the local queries' sequence indices as
    `q_positions`, so its block skipping sees the zigzag layout.
    """
    context = context_size()
    order_T = zigzag_indices(kv_BTL.shape[1], context)
    dt = q_nope_BTNH.dtype
    segs = () if segment_ids_BT is None else (segment_ids_BT,)

    def body(q_nope_BtNH, q_pe_BtNR, kv_BtL, wk_b, wv_b, *seg_Bt):
        q_index_t = _local_indices(order_T, kv_BtL.shape[1])
        kv_BSL = _gather_in_order(kv_BtL, context)
        seg = (seg_Bt[0], _gather_in_order(seg_Bt[0], context)) if seg_Bt else None
        return _dense_attention(q_nope_BtNH, q_pe_BtNR, kv_BSL, q_index_t, seg,
                                wk_b.astype(dt), wv_b.astype(dt), sm_scale, implementation)

    per_head = ("batch", "length", "act_heads", None)
    weight = (None, "act_heads", None)
    return sharding.per_shard(
        body, (q_nope_BTNH, q_pe_BTNR, kv_BTL, wk_b_CNH, wv_b_CNV, *segs),
        (per_head, per_head, ("batch", "length", None), weight, weight)
        + (("batch", "length"),) * len(segs),
        per_head, out_shapes=(*q_nope_BTNH.shape[:3], wv_b_CNV.shape[-1]))


def _local_indices(order_T: np.ndarray, t_local: int) -> jax.Array:
    """[t] int32: the sequence indices of this shard's tokens (inside `shard_map`)."""
    start = jax.lax.axis_index(AXIS) * t_local
    return jax.lax.dynamic_slice_in_dim(jnp.asarray(order_T, jnp.int32), start, t_local)


def _gather_in_order(x_Bt: jax.Array, context: int) -> jax.Array:
    """Every shard's rows of x [B, t, ...] (inside `shard_map`), all-gathered along `context`
    and put in sequence order: [B, T, ...]. Its transpose reduce-scatters."""
    return _unzigzag_gathered(jax.lax.all_gather(x_Bt, AXIS, axis=1, tiled=True), context)


def _dense_attention(q_nope_BtNH, q_pe_BtNR, kv_BSL, q_index_t, segs, wk_b_CNH, wv_b_CNV,
                     sm_scale, implementation):
    """One shard's queries (t of them, at sequence indices q_index_t) over every key they see
    in the gathered latent kv_BSL (sequence order): o [B, t, N, V]; segs: None or
    (q_seg_Bt, k_seg_BS). On the Pallas kernel when `implementation` is given, else a block of
    keys at a time (key_blocks.py)."""
    if implementation is not None:
        return _kernel_attention(q_nope_BtNH, q_pe_BtNR, kv_BSL, q_index_t, segs, wk_b_CNH,
                                 wv_b_CNV, sm_scale, implementation)
    (b, t_local), s = q_nope_BtNH.shape[:2], kv_BSL.shape[1]
    if segs is None:
        segs = jnp.zeros((b, t_local), jnp.int32), jnp.zeros((b, s), jnp.int32)
    index = (q_index_t, segs[0], jnp.arange(s, dtype=jnp.int32), segs[1])
    return key_blocks.latent_attention_blocked(q_nope_BtNH, q_pe_BtNR, kv_BSL, index, wk_b_CNH,
                                               wv_b_CNV, sm_scale, num_key_blocks(s))


def _kernel_attention(q_nope_BtNH, q_pe_BtNR, kv_BSL, q_index_t, segs, wk_b_CNH, wv_b_CNV,
                      sm_scale, implementation):
    """`_dense_attention` on the Pallas kernel."""
    import pallas_kernels  # the second package of this repository

    c = wk_b_CNH.shape[0]
    k_nope_BSNH = dense(kv_BSL[..., :c], wk_b_CNH)  # 'BSC,CNH->BSNH'
    v_BSNV = dense(kv_BSL[..., :c], wv_b_CNV)  # 'BSC,CNV->BSNV'
    return pallas_kernels.mla_attention(
        q_nope_BtNH, q_pe_BtNR, k_nope_BSNH, kv_BSL[..., c:], v_BSNV, sm_scale=sm_scale,
        causal=True, segment_ids=segs, implementation=implementation, q_positions=q_index_t)


# --- V3.2: the indexer's selection, the sparse attention and the indexer's KL -------------------
@dataclasses.dataclass(frozen=True)
class IndexedAttention:
    """`indexed_latent_attention`'s results, global arrays in the zigzag layout: the attention
    output o_BTNV [B, T, N, V]; the indexer's KL per token kl_BT [B, T] float32 (None unless
    asked for); the selected keys' sequence indices idx_BTK [B, T, K] int32 (-1: none; None
    in the dense stage)."""

    o_BTNV: jax.Array
    kl_BT: jax.Array | None
    idx_BTK: jax.Array | None


def indexed_latent_attention(
    q_nope_BTNH: jax.Array,
    q_pe_BTNR: jax.Array,
    kv_BTL: jax.Array,
    segment_ids_BT: jax.Array | None,
    wk_b_CNH: jax.Array,
    wv_b_CNV: jax.Array,
    sm_scale: float,
    indexer_BT: tuple[jax.Array, jax.Array, jax.Array],
    config: ModelConfig,
    *,
    sparse: bool,
    want_loss: bool,
    implementation: str | None = None,
) -> IndexedAttention:
    """One V3.2 layer's attention on a context mesh (`index_topk`, `index_block_q`,
    `index_block_k` from `config`).

    Inputs as `gathered_latent_attention`'s, plus the indexer's per-token arrays
    indexer_BT = (q [B, T, n, d], w [B, T, n], k [B, T, d]), from detached inputs. Per shard,
    the latent, the indexer's keys and the segment ids are all-gathered along `context` and put
    in sequence order (the backward reduce-scatters the latent's and the keys' gradients), and
    the shard's t queries, at their sequence indices, meet every key of the sequence:
      sparse: each query's top-k keys by the indexer (dsa_blocked.top_k), the absorbed
        attention over them (dsa_blocked.sparse_attention) and, with want_loss, the KL over
        them (dsa_blocked.sparse_kl);
      else (the dense warm-up): the dense attention of `gathered_latent_attention` (on the
        kernel when `implementation` says) and, with want_loss, the KL over every key the query
        sees (dsa_blocked.dense_kl).
    The KL's target reads the queries with every head (it averages their probabilities) and is
    detached: the KL's gradient reaches the indexer's q, w and k only."""
    c, context = config, context_size()
    order_T = zigzag_indices(kv_BTL.shape[1], context)
    dt, sg = q_nope_BTNH.dtype, jax.lax.stop_gradient
    segs = () if segment_ids_BT is None else (segment_ids_BT,)
    # The target's queries again, every head on every shard (it averages over them).
    target_BT = (sg(q_nope_BTNH), sg(q_pe_BTNR), sg(wk_b_CNH)) if want_loss else ()

    def body(q_nope_BtNH, q_pe_BtNR, kv_BtL, wk_b, wv_b, q_Btnd, w_Btn, k_Btd, *rest):
        target, seg_Bt = rest[:len(target_BT)], rest[len(target_BT):]
        q_index_t = _local_indices(order_T, kv_BtL.shape[1])
        kv_BSL, k_BSd = _gather_in_order(kv_BtL, context), _gather_in_order(k_Btd, context)
        seg_BS = _gather_in_order(seg_Bt[0], context) if seg_Bt else None
        wk_b, wv_b = wk_b.astype(dt), wv_b.astype(dt)
        kl_Bt = idx_BtK = None
        if sparse:
            idx_BtK = dsa_blocked.top_k(q_Btnd, w_Btn, k_BSd, seg_BS, c.index_topk,
                                        c.index_block_q, c.index_block_k, q_index_t)
            o_BtNV = dsa_blocked.sparse_attention(q_nope_BtNH, q_pe_BtNR, kv_BSL, wk_b, wv_b,
                                                  idx_BtK, sm_scale, c.index_block_q)
            if target:
                kl_Bt = dsa_blocked.sparse_kl(target[0], target[1], kv_BSL, target[2], idx_BtK,
                                              q_Btnd, w_Btn, k_BSd, sm_scale, c.index_block_q)
        else:
            o_BtNV = _dense_attention(q_nope_BtNH, q_pe_BtNR, kv_BSL, q_index_t,
                                      (seg_Bt[0], seg_BS) if seg_Bt else None, wk_b, wv_b,
                                      sm_scale, implementation)
            if target:
                kl_Bt = dsa_blocked.dense_kl(target[0], target[1], kv_BSL, target[2], seg_BS,
                                             q_Btnd, w_Btn, k_BSd, sm_scale, c.index_block_q,
                                             c.index_block_k, q_index_t)
        return o_BtNV, kl_Bt, idx_BtK

    per_head = ("batch", "length", "act_heads", None)
    every_head = ("batch", "length", None, None)
    per_token = ("batch", "length", None)
    weight = (None, "act_heads", None)
    in_names = ((per_head, per_head, per_token, weight, weight, every_head, per_token, per_token)
                + (every_head, every_head, (None, None, None))[:len(target_BT)]
                + (("batch", "length"),) * len(segs))
    b, t, n = q_nope_BTNH.shape[:3]
    o_BTNV, kl_BT, idx_BTK = sharding.per_shard(
        body, (q_nope_BTNH, q_pe_BTNR, kv_BTL, wk_b_CNH, wv_b_CNV, *indexer_BT, *target_BT, *segs),
        in_names, (per_head, ("batch", "length"), per_token),
        out_shapes=((b, t, n, wv_b_CNV.shape[-1]), (b, t), (b, t, min(c.index_topk, t))))
    return IndexedAttention(o_BTNV, kl_BT, idx_BTK)
