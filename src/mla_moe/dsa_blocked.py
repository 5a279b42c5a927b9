"""DeepSeek Sparse Attention for training and prefill without a cache, a query block at a time.

The dense forms (indexer.py, dsa_loss.py, attention.py) build [B, T, S] indexer scores and
masks and [B, N, T, S] attention scores: fine for a few thousand tokens, impossible at 128K.
Here every quantity is formed for one block of queries (and, where all keys are needed, one
block of keys) inside a loop, so memory grows with T, never with T x T:

- `top_k`: the indexer's top-k [B, T, K], each query block scanning the key blocks up to
  its diagonal with a running top-k (lax.top_k over the running K and the block's S scores),
  causal and segment masks applied before it. Not differentiable (the selection is discrete).
- `sparse_attention`: the main attention over the selected keys in the absorbed form (MQA over
  the latent, as DeepSeek trains V3.2): per query block the selected latent rows [B, T, K, L]
  are gathered, W_UK is folded into the block's queries and W_UV applied to its latent output.
  Each block is rematerialised in the backward (jax.checkpoint), so the gathered rows of only
  one block are live; the gather's transpose is a scatter-add into the latent's gradient.
- `sparse_kl`: the indexer's KL over the selected keys (V3.2's sparse training stage), target
  and indexer logits both at the block's gathered keys.
- `dense_kl`: the KL over every causal key (the dense warm-up stage): per query block a first
  pass over the key blocks gives each head's log-sum-exp, a second accumulates
  sum p log p, sum p I and the online logsumexp of I. Its gradient (a custom VJP) runs the key
  blocks once more, with dKL/dI = softmax(I) - p.

`top_k` and `dense_kl` take the queries' indices in the key sequence (`q_index_T`, default
0..T-1: the queries are the keys): context parallelism (context_parallel.py) runs them for a
shard's queries (two chunks of the sequence) against every key.

The entry points (`select`, `attention`, `indexer_loss`) run per shard of the mesh in effect
(`sharding.per_shard`, the batch split): left to the partitioner, a scan over query blocks
reduces each block's weight gradient over the batch shards inside every iteration (2 x 10^5
all-reduces per step for V3.2 on v5p:8x8x8 at 64K tokens); per shard, a weight is gathered
once and its gradient reduced once, and every loop is local to its sequences.

The targets are detached: only the indexer's q, w and k receive gradients from the KL.
Costs worth knowing: `sparse_kl` recomputes the attention scores at the selected keys (about a
quarter of the sparse attention's forward and backward); `dense_kl` forms the absorbed scores
(C + R wide, ~3x the naive form's H + R) three times (two passes and the backward) and skips
the key blocks above each query block's diagonal.

Legend: see layers.py; as in indexer.py, n the indexer heads and d the indexer head dim (q_BTnd,
w_BTn, k_BSd), and K the selected keys per query. Inside a block function T and S are one query
block's and one key block's lengths; O counts the blocks.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from mla_moe import sharding
from mla_moe.config import ModelConfig
from mla_moe.indexer import index_scores
from mla_moe.sharding import PER_HEAD, PER_TOKEN

_NEG = -1e30  # a finite "masked out": exp underflows to 0, and no inf - inf in the gradients


@dataclasses.dataclass(frozen=True)
class Selection:
    """The blocked path's choice for one layer: idx_BTK [B, T, K] int32 (-1: no key)."""

    idx_BTK: jax.Array


@dataclasses.dataclass(frozen=True)
class LossInputs:
    """What the blocked KL of one layer needs from the indexer: its (detached-input) queries,
    weights and keys, the segments, and the selection (None: the dense stage, every key)."""

    q_BTnd: jax.Array
    w_BTn: jax.Array
    k_BSd: jax.Array
    segment_ids_BT: jax.Array | None
    selection: Selection | None


def select(config: ModelConfig, q_BTnd: jax.Array, w_BTn: jax.Array, k_BSd: jax.Array,
           segment_ids_BT: jax.Array | None, want_loss: bool
           ) -> tuple[Selection | None, LossInputs | None]:
    """The selection of a V3.2 layer on a long sequence without a cache, from the indexer's
    queries, weights and keys (computed from detached inputs): (the top-k, or None in the
    dense stage `index_attention="dense"`, which needs none; the KL's inputs when
    `want_loss`)."""
    c = config
    selection = None
    if c.index_attention == "sparse":
        seg_BT = _segments(segment_ids_BT, *w_BTn.shape[:2])
        idx_BTK = sharding.per_shard(
            lambda q, w, k, seg: top_k(q, w, k, seg, c.index_topk, c.index_block_q,
                                       c.index_block_k),
            (q_BTnd, w_BTn, k_BSd, seg_BT),
            (PER_TOKEN + (None,), PER_TOKEN, PER_TOKEN, PER_TOKEN[:2]), PER_TOKEN)
        selection = Selection(idx_BTK)
    inputs = LossInputs(q_BTnd, w_BTn, k_BSd, segment_ids_BT, selection) if want_loss else None
    return selection, inputs


def attention(q_nope_BTNH: jax.Array, q_pe_BTNR: jax.Array, kv_BSL: jax.Array,
              w_uk_CNH: jax.Array, w_uv_CNV: jax.Array, selection: Selection, sm_scale: float,
              block_q: int) -> jax.Array:
    """`sparse_attention` per shard of the mesh in effect (batch and heads split)."""
    weight = (None, "act_heads", None)
    return sharding.per_shard(
        lambda *a: sparse_attention(*a, sm_scale, block_q),
        (q_nope_BTNH, q_pe_BTNR, kv_BSL, w_uk_CNH, w_uv_CNV, selection.idx_BTK),
        (PER_HEAD, PER_HEAD, PER_TOKEN, weight, weight, PER_TOKEN), PER_HEAD)


def indexer_loss(q_nope_BTNH: jax.Array, q_pe_BTNR: jax.Array, kv_BSL: jax.Array,
                 w_uk_CNH: jax.Array, inputs: LossInputs, sm_scale: float, block_q: int,
                 block_k: int) -> jax.Array:
    """The layer's indexer loss, `dsa_loss.indexer_kl` blocked: the mean over the tokens of
    `sparse_kl` (over the selection) or `dense_kl` (every causal key, the dense stage), per
    shard of the mesh in effect (the batch split; every head, whose probabilities it sums)."""
    if inputs.selection is None:  # the dense stage: the segments say which keys are seen
        def kl(q_nope, q_pe, kv, w_uk, seg, q, w, k):
            return dense_kl(q_nope, q_pe, kv, w_uk, seg, q, w, k, sm_scale, block_q, block_k)

        keys = _segments(inputs.segment_ids_BT, *inputs.w_BTn.shape[:2])
    else:
        def kl(q_nope, q_pe, kv, w_uk, idx, q, w, k):
            return sparse_kl(q_nope, q_pe, kv, w_uk, idx, q, w, k, sm_scale, block_q)

        keys = inputs.selection.idx_BTK
    args = (q_nope_BTNH, q_pe_BTNR, kv_BSL, w_uk_CNH, keys, inputs.q_BTnd, inputs.w_BTn,
            inputs.k_BSd)
    every_head = ("batch", None, None, None)
    names = (every_head, every_head, PER_TOKEN, (None, None, None), PER_TOKEN[:keys.ndim],
             every_head, PER_TOKEN, PER_TOKEN)
    return jnp.mean(sharding.per_shard(kl, args, names, PER_TOKEN[:2]))


# --- blocking --------------------------------------------------------------------------------
def _pad(x: jax.Array, axis: int, multiple: int, value=0) -> jax.Array:
    """x padded along `axis` to a multiple of `multiple` (with `value`)."""
    extra = -x.shape[axis] % multiple
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _blocks(x_BX: jax.Array, size: int, value=0) -> jax.Array:
    """[B, T, ...] -> [O, B, size, ...]: the query axis padded and cut into O blocks."""
    x = _pad(x_BX, 1, size, value)
    b, t = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, t // size, size, *x.shape[2:]), 1, 0)


def _unblock(x_OBX: jax.Array, length: int) -> jax.Array:
    """[O, B, size, ...] -> [B, length, ...] (the padding dropped)."""
    o, b, size = x_OBX.shape[:3]
    return jnp.moveaxis(x_OBX, 0, 1).reshape(b, o * size, *x_OBX.shape[3:])[:, :length]


def _segments(segment_ids_BT: jax.Array | None, b: int, t: int) -> jax.Array:
    return jnp.zeros((b, t), jnp.int32) if segment_ids_BT is None else segment_ids_BT


def _query_layout(segment_ids_BS: jax.Array | None, q_index_T: jax.Array | None, b: int,
                  t: int, s: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(q_index [T], the queries' segments [B, T], the keys' [B, S]): the queries are the keys
    at q_index_T (default 0..T-1, then T = S)."""
    seg_BS = _segments(segment_ids_BS, b, s)
    if q_index_T is None:
        return jnp.arange(t, dtype=jnp.int32), seg_BS, seg_BS
    return q_index_T.astype(jnp.int32), jnp.take(seg_BS, q_index_T, axis=1), seg_BS


def _key_block(x_BS: jax.Array, j, size: int) -> jax.Array:
    """Key block j ([B, size, ...]) of an array padded to a multiple of `size`."""
    return jax.lax.dynamic_slice_in_dim(x_BS, j * size, size, axis=1)


def _visible(q_index_T: jax.Array, j, block_k: int, seg_BT: jax.Array, seg_BS: jax.Array
             ) -> jax.Array:
    """[B, T, S]: a query block's rows (at key indices q_index_T) see key block j's keys at or
    before them, same segment."""
    s_S = j * block_k + jnp.arange(block_k)
    return ((s_S[None, None, :] <= q_index_T[None, :, None])
            & (seg_BT[:, :, None] == seg_BS[:, None, :]))


def _last_key_block(q_index_T: jax.Array, block_k: int, num_key_blocks: int):
    """The last key block holding a key at or before one of the query block's rows (padding
    rows have index -1)."""
    return jnp.minimum(jnp.max(q_index_T) // block_k, num_key_blocks - 1)


def _absorbed_query(q_nope_BTNH, q_pe_BTNR, w_uk_CNH) -> jax.Array:
    """[q_nope W_UK; q_pe]: [B, T, N, L], the query that meets the latent entry directly."""
    q_latent_BTNC = jnp.einsum("BTNH,CNH->BTNC", q_nope_BTNH, w_uk_CNH.astype(q_nope_BTNH.dtype))
    return jnp.concatenate([q_latent_BTNC, q_pe_BTNR.astype(q_latent_BTNC.dtype)], axis=-1)


def _gather(x_BSX: jax.Array, idx_BTK: jax.Array) -> jax.Array:
    """Rows idx of each sequence: [B, T, K, ...] (-1 reads row 0; callers mask it)."""
    return jax.vmap(lambda x_SX, i_TK: x_SX[i_TK])(x_BSX, jnp.maximum(idx_BTK, 0))


# --- the indexer's top-k ----------------------------------------------------------------------
def top_k(q_BTnd: jax.Array, w_BTn: jax.Array, k_BSd: jax.Array,
          segment_ids_BS: jax.Array | None, k: int, block_q: int, block_k: int,
          q_index_T: jax.Array | None = None) -> jax.Array:
    """The indices [B, T, min(k, S)] int32 of each query's highest indexer scores among the
    keys it sees (causal, same segment), -1 where it sees fewer: `indexer.top_k` over
    `indexer.index_scores` without the [B, T, S] scores. Ties go to whatever lax.top_k picks;
    the selection is a set. Per step: O(block_q x (K + block_k)) scores plus the indexer's
    [B, block_q, n, block_k] products. No gradient flows (the inputs are stopped).

    segment_ids_BS: the keys' segments (None: one per row); q_index_T: the queries' indices
    among the keys (default 0..T-1, with T = S), the causal mask's and the segments'."""
    b, t = q_BTnd.shape[:2]
    k = min(k, k_BSd.shape[1])
    q_index_T, seg_BT, seg_BS = _query_layout(segment_ids_BS, q_index_T, b, t, k_BSd.shape[1])
    q_BTnd, w_BTn, k_BSd = jax.lax.stop_gradient((q_BTnd, w_BTn, k_BSd))
    k_BSd, seg_BS = _pad(k_BSd, 1, block_k), _pad(seg_BS, 1, block_k, -1)
    num_key_blocks = k_BSd.shape[1] // block_k

    def query_block(q_index_T, q_BTnd, w_BTn, seg_BT):
        def merge(j, carry):
            vals_BTK, idx_BTK = carry
            scores_BTS = index_scores(q_BTnd, w_BTn, _key_block(k_BSd, j, block_k))
            vis_BTS = _visible(q_index_T, j, block_k, seg_BT, _key_block(seg_BS, j, block_k))
            s_BTS = jnp.broadcast_to(j * block_k + jnp.arange(block_k, dtype=jnp.int32),
                                     scores_BTS.shape)
            vals_BTX = jnp.concatenate([vals_BTK, jnp.where(vis_BTS, scores_BTS, -jnp.inf)], -1)
            vals_BTK, pos_BTK = jax.lax.top_k(vals_BTX, k)
            idx_BTX = jnp.concatenate([idx_BTK, s_BTS], axis=-1)
            return vals_BTK, jnp.take_along_axis(idx_BTX, pos_BTK, axis=-1)

        init = (jnp.full((b, block_q, k), -jnp.inf, jnp.float32),
                jnp.full((b, block_q, k), -1, jnp.int32))
        last = _last_key_block(q_index_T, block_k, num_key_blocks)
        vals_BTK, idx_BTK = jax.lax.fori_loop(0, last + 1, merge, init)
        return jnp.where(vals_BTK > -jnp.inf, idx_BTK, -1)

    qs = (_blocks(q_index_T[None], block_q, -1)[:, 0], _blocks(q_BTnd, block_q),
          _blocks(w_BTn, block_q), _blocks(seg_BT, block_q, -2))
    idx_OBTK = jax.lax.map(lambda a: query_block(*a), qs)
    return _unblock(idx_OBTK, t)


# --- the main attention over the selected keys -------------------------------------------------
def _selected_probs(q_BTNL, rows_BTKL, valid_BTK, sm_scale) -> jax.Array:
    """Softmax [B, T, N, K] float32 of each head over its query's valid selected keys (a row
    with none gives zeros)."""
    scores_BTNK = jnp.einsum("BTNL,BTKL->BTNK", q_BTNL, rows_BTKL.astype(q_BTNL.dtype),
                             preferred_element_type=jnp.float32) * sm_scale
    valid_BT1K = valid_BTK[:, :, None, :]
    probs_BTNK = jax.nn.softmax(jnp.where(valid_BT1K, scores_BTNK, _NEG), axis=-1)
    return jnp.where(valid_BT1K, probs_BTNK, 0.0)


def sparse_attention(q_nope_BTNH: jax.Array, q_pe_BTNR: jax.Array, kv_BSL: jax.Array,
                     w_uk_CNH: jax.Array, w_uv_CNV: jax.Array, idx_BTK: jax.Array,
                     sm_scale: float, block_q: int) -> jax.Array:
    """o [B, T, N, V]: each query's attention over its selected latent entries idx_BTK (-1:
    none), absorbed form, softmax in float32; the same function as the naive or absorbed MLA
    attention under the mask "causal and selected". Differentiable w.r.t. the queries, the
    latent and both weights; memory O(block_q x K x L) per block, in the backward too."""
    t, c = q_nope_BTNH.shape[1], w_uk_CNH.shape[0]
    dt, kv_dt = q_nope_BTNH.dtype, kv_BSL.dtype
    # What every block reads whole, in float32: the scan sums their gradients over the blocks
    # (up to T / block_q terms) in the dtype they enter it with.
    kv_BSL, w_uk_CNH, w_uv_CNV = (a.astype(jnp.float32) for a in (kv_BSL, w_uk_CNH, w_uv_CNV))

    @jax.checkpoint
    def query_block(q_nope_BTNH, q_pe_BTNR, idx_BTK):
        q_BTNL = _absorbed_query(q_nope_BTNH, q_pe_BTNR, w_uk_CNH)
        rows_BTKL = _gather(kv_BSL, idx_BTK).astype(kv_dt)
        probs_BTNK = _selected_probs(q_BTNL, rows_BTKL, idx_BTK >= 0, sm_scale)
        # The weighted sum runs over the whole entry (its R rope columns dropped after), as
        # attention.absorbed_attention does, so the gathered rows are never sliced.
        o_BTNL = jnp.einsum("BTNK,BTKL->BTNL", probs_BTNK.astype(rows_BTKL.dtype), rows_BTKL,
                            preferred_element_type=jnp.float32)
        return jnp.einsum("BTNC,CNV->BTNV", o_BTNL[..., :c].astype(dt), w_uv_CNV.astype(dt))

    xs = (_blocks(q_nope_BTNH, block_q), _blocks(q_pe_BTNR, block_q),
          _blocks(idx_BTK, block_q, -1))
    _, o_OBTNV = jax.lax.scan(lambda _, a: (None, query_block(*a)), None, xs)
    return _unblock(o_OBTNV, t)


# --- the indexer's KL over the selected keys (sparse training) ---------------------------------
def _kl_rows(p_BTX: jax.Array, scores_BTX: jax.Array, valid_BTX: jax.Array) -> jax.Array:
    """dsa_loss.kl_to_scores with finite masking: KL(p || softmax(scores)) per row over the
    valid entries, 0 (and a zero gradient, not NaN) for a row with none."""
    log_q_BTX = jax.nn.log_softmax(jnp.where(valid_BTX, scores_BTX, _NEG), axis=-1)
    p_BTX = jnp.where(valid_BTX, p_BTX, 0.0)
    log_p_BTX = jnp.log(jnp.where(p_BTX > 0, p_BTX, 1.0))
    return jnp.sum(jnp.where(p_BTX > 0, p_BTX * (log_p_BTX - log_q_BTX), 0.0), axis=-1)


def sparse_kl(q_nope_BTNH: jax.Array, q_pe_BTNR: jax.Array, kv_BSL: jax.Array,
              w_uk_CNH: jax.Array, idx_BTK: jax.Array, q_BTnd: jax.Array, w_BTn: jax.Array,
              k_BSd: jax.Array, sm_scale: float, block_q: int) -> jax.Array:
    """KL [B, T] float32 from the main attention's probabilities at each query's selected keys
    (summed over the heads, / N; detached) to the softmax of the indexer's scores at the same
    keys: `dsa_loss.kl_to_scores(attention_target(...), index_scores(...), selected)` without
    [B, T, S]. Gradients reach the indexer's q_BTnd, w_BTn and k_BSd only."""
    t = q_nope_BTNH.shape[1]
    sg = jax.lax.stop_gradient
    q_nope_BTNH, q_pe_BTNR, kv_BSL, w_uk_CNH = sg((q_nope_BTNH, q_pe_BTNR, kv_BSL, w_uk_CNH))
    scale = q_BTnd.shape[-1] ** -0.5
    k_BSd = k_BSd.astype(jnp.float32)  # its gradient is summed over the blocks (as above)

    @jax.checkpoint
    def query_block(q_nope_BTNH, q_pe_BTNR, idx_BTK, q_BTnd, w_BTn):
        valid_BTK = idx_BTK >= 0
        q_BTNL = _absorbed_query(q_nope_BTNH, q_pe_BTNR, w_uk_CNH)
        probs_BTNK = _selected_probs(q_BTNL, _gather(kv_BSL, idx_BTK), valid_BTK, sm_scale)
        target_BTK = sg(jnp.mean(probs_BTNK, axis=2))
        keys_BTKd = _gather(k_BSd, idx_BTK).astype(q_BTnd.dtype)
        s_BTnK = jnp.einsum("BTnd,BTKd->BTnK", q_BTnd, keys_BTKd,
                            preferred_element_type=jnp.float32)
        scores_BTK = jnp.einsum("BTnK,BTn->BTK", jax.nn.relu(s_BTnK * scale), w_BTn)
        return _kl_rows(target_BTK, scores_BTK, valid_BTK)

    xs = (_blocks(q_nope_BTNH, block_q), _blocks(q_pe_BTNR, block_q),
          _blocks(idx_BTK, block_q, -1), _blocks(q_BTnd, block_q), _blocks(w_BTn, block_q))
    _, kl_OBT = jax.lax.scan(lambda _, a: (None, query_block(*a)), None, xs)
    return _unblock(kl_OBT, t)


# --- the indexer's KL over every causal key (dense warm-up) ------------------------------------
def dense_kl(q_nope_BTNH: jax.Array, q_pe_BTNR: jax.Array, kv_BSL: jax.Array,
             w_uk_CNH: jax.Array, segment_ids_BS: jax.Array | None, q_BTnd: jax.Array,
             w_BTn: jax.Array, k_BSd: jax.Array, sm_scale: float, block_q: int, block_k: int,
             q_index_T: jax.Array | None = None) -> jax.Array:
    """KL [B, T] float32 from the main attention's probabilities over every key each query
    sees (causal, same segment; summed over heads, / N; detached) to the softmax of the
    indexer's scores: `dsa_loss.kl_to_scores(attention_target(...), index_scores(...),
    visible)` without [B, T, S]. Per query block, with p = mean_n exp(score_n - lse_n):

        KL = sum_s p log p - sum_s p I + logsumexp_s I

    lse_n (each head's log-sum-exp) from a first pass over the key blocks, the three terms
    accumulated over them in a second. Gradients reach q_BTnd, w_BTn and k_BSd only.

    segment_ids_BS and q_index_T: the keys' segments and the queries' indices among the keys,
    as for `top_k`."""
    b, t = q_nope_BTNH.shape[:2]
    layout = _query_layout(segment_ids_BS, q_index_T, b, t, k_BSd.shape[1])
    target_inputs = jax.lax.stop_gradient((q_nope_BTNH, q_pe_BTNR, kv_BSL, w_uk_CNH))
    kl_OBT = _dense_kl((sm_scale, block_q, block_k), *target_inputs, layout, q_BTnd, w_BTn,
                       k_BSd)
    return _unblock(kl_OBT, t)


def _dense_kl_setup(blocks, q_nope, q_pe, kv, layout, q, w, k):
    """The query-side arrays cut into blocks (the queries' key indices first) and the key-side
    ones padded to whole blocks; layout: `_query_layout`'s."""
    _, block_q, block_k = blocks
    q_index_T, q_seg_BT, seg_BS = layout
    queries = (_blocks(q_index_T[None], block_q, -1)[:, 0], _blocks(q_nope, block_q),
               _blocks(q_pe, block_q), _blocks(q_seg_BT, block_q, -2), _blocks(q, block_q),
               _blocks(w, block_q))
    keys = (_pad(kv, 1, block_k), _pad(seg_BS, 1, block_k, -1), _pad(k, 1, block_k))
    return queries, keys


def _target(blocks, w_uk_CNH, keys, q_index_T, q_nope_BTNH, q_pe_BTNR, seg_BT, lse_BTN=None):
    """A query block's attention target over the key blocks: (the last key block it sees,
    target(j) -> (p [B, T, S] float32, visible [B, T, S]) for key block j, lse_n [B, T, N]
    (each head's log-sum-exp, computed by a pass over the key blocks unless given))."""
    sm_scale, _, block_k = blocks
    kv_BSL, seg_BS, _ = keys
    last = _last_key_block(q_index_T, block_k, kv_BSL.shape[1] // block_k)
    q_BTNL = _absorbed_query(q_nope_BTNH, q_pe_BTNR, w_uk_CNH)

    def scores(j):
        kv_BSL_j = _key_block(kv_BSL, j, block_k).astype(q_BTNL.dtype)
        s_BTNS = jnp.einsum("BTNL,BSL->BTNS", q_BTNL, kv_BSL_j,
                            preferred_element_type=jnp.float32) * sm_scale
        return s_BTNS, _visible(q_index_T, j, block_k, seg_BT, _key_block(seg_BS, j, block_k))

    def lse_step(j, carry):
        m_BTN, l_BTN = carry
        s_BTNS, vis_BTS = scores(j)
        vis_BT1S = vis_BTS[:, :, None, :]
        m_new_BTN = jnp.maximum(m_BTN, jnp.max(jnp.where(vis_BT1S, s_BTNS, _NEG), axis=-1))
        e_BTNS = jnp.where(vis_BT1S, jnp.exp(s_BTNS - m_new_BTN[..., None]), 0.0)
        return m_new_BTN, l_BTN * jnp.exp(m_BTN - m_new_BTN) + jnp.sum(e_BTNS, axis=-1)

    if lse_BTN is None:
        b, t, n, _ = q_BTNL.shape
        init = (jnp.full((b, t, n), _NEG, jnp.float32), jnp.zeros((b, t, n), jnp.float32))
        m_BTN, l_BTN = jax.lax.fori_loop(0, last + 1, lse_step, init)
        lse_BTN = jnp.where(l_BTN > 0, m_BTN + jnp.log(jnp.where(l_BTN > 0, l_BTN, 1.0)), 0.0)

    def target(j):
        s_BTNS, vis_BTS = scores(j)
        p_BTNS = jnp.where(vis_BTS[:, :, None, :], jnp.exp(s_BTNS - lse_BTN[..., None]), 0.0)
        return jnp.mean(p_BTNS, axis=2), vis_BTS

    return last, target, lse_BTN


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _dense_kl(blocks, q_nope, q_pe, kv, w_uk, layout, q, w, k):
    """KL [O, B, T] of the query blocks; blocks = (sm_scale, block_q, block_k)."""
    return _dense_kl_fwd(blocks, q_nope, q_pe, kv, w_uk, layout, q, w, k)[0]


def _dense_kl_fwd(blocks, q_nope, q_pe, kv, w_uk, layout, q, w, k):
    block_k = blocks[2]
    queries, keys = _dense_kl_setup(blocks, q_nope, q_pe, kv, layout, q, w, k)

    def query_block(q_index_T, q_nope_BTNH, q_pe_BTNR, seg_BT, q_BTnd, w_BTn):
        last, target, lse_BTN = _target(blocks, w_uk, keys, q_index_T, q_nope_BTNH, q_pe_BTNR,
                                        seg_BT)

        def step(j, carry):
            plogp_BT, pi_BT, m_BT, l_BT = carry
            p_BTS, vis_BTS = target(j)
            i_BTS = index_scores(q_BTnd, w_BTn, _key_block(keys[2], j, block_k))
            i_BTS = jnp.where(vis_BTS, i_BTS, _NEG)
            plogp_BT += jnp.sum(jnp.where(p_BTS > 0, p_BTS * jnp.log(
                jnp.where(p_BTS > 0, p_BTS, 1.0)), 0.0), axis=-1)
            pi_BT += jnp.sum(jnp.where(vis_BTS, p_BTS * i_BTS, 0.0), axis=-1)
            m_new_BT = jnp.maximum(m_BT, jnp.max(i_BTS, axis=-1))
            e_BTS = jnp.where(vis_BTS, jnp.exp(i_BTS - m_new_BT[..., None]), 0.0)
            return plogp_BT, pi_BT, m_new_BT, l_BT * jnp.exp(m_BT - m_new_BT) + jnp.sum(e_BTS, -1)

        zeros_BT = jnp.zeros(q_BTnd.shape[:2], jnp.float32)
        init = (zeros_BT, zeros_BT, jnp.full(zeros_BT.shape, _NEG, jnp.float32), zeros_BT)
        plogp_BT, pi_BT, m_BT, l_BT = jax.lax.fori_loop(0, last + 1, step, init)
        seen_BT = l_BT > 0
        lse_i_BT = jnp.where(seen_BT, m_BT + jnp.log(jnp.where(seen_BT, l_BT, 1.0)), 0.0)
        return jnp.where(seen_BT, plogp_BT - pi_BT + lse_i_BT, 0.0), lse_BTN, lse_i_BT

    kl_OBT, lse_OBTN, lse_i_OBT = jax.lax.map(lambda a: query_block(*a), queries)
    return kl_OBT, (q_nope, q_pe, kv, w_uk, layout, q, w, k, lse_OBTN, lse_i_OBT)


def _dense_kl_bwd(blocks, res, g_OBT):
    """dKL/dI[t, s] = softmax(I)[t, s] - p[t, s] over the visible keys, then back through
    `index_scores` one key block at a time (k's gradient accumulated over the query blocks).
    The target is detached: its inputs get no gradient (None)."""
    block_k = blocks[2]
    q_nope, q_pe, kv, w_uk, layout, q, w, k, lse_OBTN, lse_i_OBT = res
    queries, keys = _dense_kl_setup(blocks, q_nope, q_pe, kv, layout, q, w, k)

    def query_block(dk_BSd, xs):
        q_index_T, q_nope_BTNH, q_pe_BTNR, seg_BT, q_BTnd, w_BTn, lse_BTN, lse_i_BT, g_BT = xs
        last, target, _ = _target(blocks, w_uk, keys, q_index_T, q_nope_BTNH, q_pe_BTNR,
                                  seg_BT, lse_BTN)

        def step(j, carry):
            dq_BTnd, dw_BTn, dk_BSd = carry
            p_BTS, vis_BTS = target(j)
            i_BTS, vjp = jax.vjp(index_scores, q_BTnd, w_BTn, _key_block(keys[2], j, block_k))
            soft_BTS = jnp.where(vis_BTS, jnp.exp(i_BTS - lse_i_BT[..., None]), 0.0)
            dq, dw, dk = vjp(g_BT[..., None] * (soft_BTS - p_BTS))
            dk_BSd_j = _key_block(dk_BSd, j, block_k) + dk.astype(jnp.float32)
            dk_BSd = jax.lax.dynamic_update_slice_in_dim(dk_BSd, dk_BSd_j, j * block_k, axis=1)
            return dq_BTnd + dq.astype(jnp.float32), dw_BTn + dw.astype(jnp.float32), dk_BSd

        init = (jnp.zeros(q_BTnd.shape, jnp.float32), jnp.zeros(w_BTn.shape, jnp.float32),
                dk_BSd)
        dq_BTnd, dw_BTn, dk_BSd = jax.lax.fori_loop(0, last + 1, step, init)
        return dk_BSd, (dq_BTnd, dw_BTn)

    xs = (*queries, lse_OBTN, lse_i_OBT, g_OBT)
    dk_BSd, (dq_OBTnd, dw_OBTn) = jax.lax.scan(
        query_block, jnp.zeros(keys[2].shape, jnp.float32), xs)
    t = q.shape[1]
    return (None, None, None, None, (None,) * 3, _unblock(dq_OBTnd, t).astype(q.dtype),
            _unblock(dw_OBTn, t).astype(w.dtype), dk_BSd[:, : k.shape[1]].astype(k.dtype))


_dense_kl.defvjp(_dense_kl_fwd, _dense_kl_bwd)
