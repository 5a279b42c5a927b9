"""pallas_kernels.sparse_latent_attention_cache (DeepSeek-V3.2's sparse decode) vs the dense
oracle, in Pallas interpret mode on CPU, and the blocked XLA reference vs the same oracle;
both vs a float64 loop on a short cache's top-k and on indices that repeat a slot.

Legend: B batch, T query len, S cache slots, N heads, C kv latent rank, R rope dim, K selected
slots per query. Slots that no query selects hold NaN / inf, so any read of an unselected
slot into a result shows up (on TPU each selected slot moves with its pair neighbour, which
is then NaN too). Tolerances, per array: max|diff| <= rel * max|expected| with rel 1e-5 in
f32 (measured: 3e-7) and 2e-2 in bf16 (measured: 2e-3), as for the dense decode.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerance import assert_close_scaled

from mla_moe import attention as attn
from mla_moe import indexer
from pallas_kernels import (
    SparseLatentBlockSizes,
    latent_attention_naive,
    sparse_latent_attention_cache,
    sparse_latent_attention_naive,
    sparse_latent_attention_reference,
)
from pallas_kernels.sparse_latent_attention_reference import selection_mask_BTS

SM_SCALE = 0.2
N, C, R = 4, 32, 8
S = 40
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
POOL = 1 << 14
FAST_COMPILE = {"xla_backend_optimization_level": 0}
# Portable kernel: 3 splits of 2 blocks of 8 indices, 8-head row blocks (N padded 4 -> 8).
SMALL = SparseLatentBlockSizes(block_k=8, block_rows=8, num_splits=3, block_k_xla=8)
# TPU kernel: index blocks are 128 lanes, so K < 128 is one block padded with -1; two splits.
TPU_SMALL = SparseLatentBlockSizes(block_k=128, block_rows=8, num_splits=2, block_k_xla=8)


def _normal(key, shape):
    """N(0, 1) from one fixed-size draw: jax.random compiles once per process, not per shape."""
    flat = np.asarray(jax.random.normal(key, (POOL,), jnp.float32))
    return flat[: int(np.prod(shape))].reshape(shape)


def _indices(seed, b, t, k, pattern, s):
    """[B, T, K] distinct slots per query, with -1 padding:
    "full": every index valid; "padded": query (b, t) keeps its first 3 + 5 b + 7 t and
    the rest is -1, scattered positions of b = 0, t = 0 are -1 too; the last query of the
    last sequence has no valid index at all; "strided": every 7th index valid, the rest -1;
    "short": the indexer's top-k of random scores over a cache that holds 3 (sequence 0) or
    30 (sequence 1) tokens before the T new ones, which query t sees too: -1 past the
    visible slots while fewer than K are, in score order, not slot order;
    "repeats": "short" with slots listed twice or three times (outside the kernel's
    contract), within a block of 8 indices and across blocks and splits."""
    rng = np.random.default_rng(seed)
    if pattern in ("short", "repeats"):
        lengths_B = jnp.asarray([3, 30][:b])
        visible_BTS = attn.cache_mask(lengths_B[:, None] + jnp.arange(t)[None, :], s)
        scores_BTS = jnp.asarray(rng.standard_normal((b, t, s)), jnp.float32)
        idx = np.array(indexer.top_k(scores_BTS, visible_BTS, k))
        if pattern == "repeats":
            idx[0, 0, 1:3] = idx[0, 0, 0]  # the top slot three times, in one block
            idx[0, -1, 3] = idx[0, -1, 2]
            idx[1, :, 20] = idx[1, :, 0]  # the last split repeats a slot of the first
            idx[1, 0, 9:12] = idx[1, 0, 5:8]  # three slots twice, across two blocks
        return idx.astype(np.int32)
    idx = np.stack([np.stack([rng.permutation(s)[:k] for _ in range(t)]) for _ in range(b)])
    if pattern == "padded":
        for bi in range(b):
            for ti in range(t):
                idx[bi, ti, 3 + 5 * bi + 7 * ti:] = -1
        idx[0, 0, ::2] = -1
        idx[-1, -1, :] = -1
    if pattern == "strided":
        idx[..., np.arange(k) % 7 != 0] = -1
    return idx.astype(np.int32)


def _inputs(seed, b, t, k, pattern, dtype, s=S):
    keys = jax.random.split(jax.random.key(seed), 3)
    q_lat, q_pe, kv = [_normal(key, shp) for key, shp in
                       zip(keys, [(b, t, N, C), (b, t, N, R), (b, s, C + R)])]
    idx = _indices(seed, b, t, k, pattern, s)
    selected_BS1 = np.asarray(selection_mask_BTS(jnp.asarray(idx), s)).any(axis=1)[..., None]
    kv = np.where(selected_BS1, kv, np.nan)  # unselected slots must never be read
    kv[..., C:] = np.where(selected_BS1, kv[..., C:], np.inf)
    args = tuple(jnp.asarray(x.astype(dtype)) for x in (q_lat, q_pe, kv))
    return args + (jnp.asarray(idx),)


def _run(fn, args):
    return jax.jit(fn).lower(args).compile(FAST_COMPILE)(args)


def _assert_close(actual, expected, dtype):
    a, e = np.asarray(actual).astype(np.float32), np.asarray(expected).astype(np.float32)
    chex.assert_equal_shape([a, e])
    chex.assert_tree_all_finite(a)
    assert_close_scaled(a, e, rel=TOL[dtype])


@functools.cache
def _oracle(seed, b, t, k, pattern, dtype, s=S):
    args = _inputs(seed, b, t, k, pattern, dtype, s)
    return args, _run(lambda a: sparse_latent_attention_naive(*a, sm_scale=SM_SCALE), args)


CASES = [  # seed, B, T, K, pattern, dtype, S, implementation, block sizes
    pytest.param(1, 2, 1, 24, "full", jnp.float32, S, "interpret", SMALL, id="T1-K<S"),
    pytest.param(2, 2, 2, 40, "padded", jnp.float32, S, "interpret", SMALL,
                 id="T2-K=S-padded"),
    pytest.param(3, 2, 2, 24, "padded", jnp.bfloat16, S, "interpret", SMALL,
                 id="T2-bf16-padded"),
    pytest.param(4, 2, 1, 24, "padded", jnp.float32, S, "interpret", None,
                 id="T1-default-blocks"),
    # S odd: the TPU path pads the cache to whole slot pairs.
    pytest.param(1, 2, 1, 24, "full", jnp.float32, S - 1, "tpu_interpret", TPU_SMALL,
                 id="tpu-T1-S-odd"),
    pytest.param(2, 2, 2, 40, "padded", jnp.float32, S, "tpu_interpret", TPU_SMALL,
                 id="tpu-T2-padded"),
    pytest.param(3, 2, 2, 24, "padded", jnp.bfloat16, S, "tpu_interpret", TPU_SMALL,
                 id="tpu-T2-bf16-padded"),
    # Three 128-index blocks in one split: each block's rows are fetched while the previous
    # block is computed, and the first buffer is reused by the third block.
    pytest.param(6, 1, 1, 260, "strided", jnp.float32, 264, "tpu_interpret",
                 SparseLatentBlockSizes(block_k=128, block_rows=8, num_splits=1),
                 id="tpu-T1-K260-three-blocks"),
]


@pytest.mark.parametrize("seed,b,t,k,pattern,dtype,s,implementation,block_sizes", CASES)
def test_kernel_matches_oracle(seed, b, t, k, pattern, dtype, s, implementation, block_sizes):
    args, want = _oracle(seed, b, t, k, pattern, dtype, s)
    got = _run(lambda a: sparse_latent_attention_cache(
        *a, sm_scale=SM_SCALE, block_sizes=block_sizes, implementation=implementation), args)
    chex.assert_shape(got, (b, t, N, C))
    assert got.dtype == dtype
    _assert_close(got, want, dtype)
    if pattern == "padded":  # the query without a valid index outputs zeros
        assert not np.asarray(got)[-1, -1].any()


def _numpy_decode(q_lat, q_pe, kv, idx):
    """Each query's softmax over its index list as written, in float64: an index < 0 adds no
    term, a slot listed m times adds m equal terms (m times its weight), no term gives 0."""
    q_lat, q_pe, kv = (np.asarray(a).astype(np.float64) for a in (q_lat, q_pe, kv))
    idx = np.asarray(idx)
    out = np.zeros(q_lat.shape)
    for b, t in np.ndindex(*idx.shape[:2]):
        rows = kv[b, idx[b, t][idx[b, t] >= 0]]
        if len(rows):
            s_NS = SM_SCALE * (q_lat[b, t] @ rows[:, :C].T + q_pe[b, t] @ rows[:, C:].T)
            p_NS = np.exp(s_NS - s_NS.max(axis=-1, keepdims=True))
            out[b, t] = (p_NS / p_NS.sum(axis=-1, keepdims=True)) @ rows[:, :C]
    return out


SHORT_CACHE_CASES = [  # pattern, dtype, implementation, block sizes
    pytest.param("short", jnp.float32, "interpret", SMALL, id="short-cache"),
    pytest.param("repeats", jnp.float32, "interpret", SMALL, id="repeats"),
    pytest.param("repeats", jnp.bfloat16, "tpu_interpret", TPU_SMALL, id="tpu-repeats-bf16"),
]


@pytest.mark.parametrize("pattern,dtype,implementation,block_sizes", SHORT_CACHE_CASES)
def test_short_cache_and_repeated_indices(pattern, dtype, implementation, block_sizes):
    """The kernel and the blocked reference against `_numpy_decode`, on the indices a top-k
    over a short cache gives (-1 padding in score order; sequence 1 sees K or more slots) and
    on indices that repeat a slot. The documented contract wants distinct slots; a repeat
    counts once per listing in both (as in any softmax over the K listed scores), while the
    mask-built oracle would count it once: pinned here so that kernel and reference agree."""
    args = _inputs(7, 2, 2, 24, pattern, dtype)
    idx = np.asarray(args[-1])
    assert np.any(idx[0] < 0) and not np.any(idx[1] < 0)  # sequence 0 sees fewer than K
    if pattern == "repeats":
        assert len(set(idx[1, 0])) < idx.shape[-1] - 3
    want = _numpy_decode(*args)
    kernel = functools.partial(
        sparse_latent_attention_cache,
        sm_scale=SM_SCALE,
        block_sizes=block_sizes,
        implementation=implementation,
    )
    reference = functools.partial(sparse_latent_attention_reference, sm_scale=SM_SCALE, block_k=16)
    got, reference = (_run(lambda a, fn=fn: fn(*a), args) for fn in (kernel, reference))
    assert got.dtype == dtype
    _assert_close(got, want, dtype)
    _assert_close(reference, want, dtype)


@pytest.mark.parametrize("seed,b,t,k,pattern,dtype", [
    (1, 2, 1, 24, "full", jnp.float32), (2, 2, 2, 40, "padded", jnp.float32),
    (3, 2, 2, 24, "padded", jnp.bfloat16)])
def test_xla_reference_matches_oracle(seed, b, t, k, pattern, dtype):
    """The blocked reference (K = 24 or 40 over blocks of 16: a partial last block)."""
    args, want = _oracle(seed, b, t, k, pattern, dtype)
    got = _run(lambda a: sparse_latent_attention_reference(*a, sm_scale=SM_SCALE, block_k=16),
               args)
    _assert_close(got, want, dtype)
    via_dispatch = _run(lambda a: sparse_latent_attention_cache(
        *a, sm_scale=SM_SCALE, implementation="xla", block_sizes=SMALL), args)
    _assert_close(via_dispatch, want, dtype)


def test_oracle_is_softmax_over_the_selected_slots():
    """The oracle itself, against a plain softmax over the gathered slots of each query, and
    against the dense decode when every slot of the cache is selected."""
    q_lat, q_pe, kv, idx = _inputs(5, 2, 2, 24, "padded", jnp.float32)
    naive = jax.jit(functools.partial(sparse_latent_attention_naive, sm_scale=SM_SCALE))
    got = np.asarray(naive(q_lat, q_pe, kv, idx))
    for b in range(2):
        for t in range(2):
            slots = np.asarray(idx[b, t])
            slots = slots[slots >= 0]
            if not len(slots):
                assert not got[b, t].any()
                continue
            rows = np.asarray(kv[b])[slots]
            s_NS = SM_SCALE * (np.asarray(q_lat[b, t]) @ rows[:, :C].T
                               + np.asarray(q_pe[b, t]) @ rows[:, C:].T)
            p_NS = np.exp(s_NS - s_NS.max(axis=-1, keepdims=True))
            want = (p_NS / p_NS.sum(axis=-1, keepdims=True)) @ rows[:, :C]
            assert_close_scaled(got[b, t], want, rel=1e-5)
    every_BTS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (2, 2, S))
    finite = [jnp.nan_to_num(x, nan=0.5, posinf=0.5) for x in (q_lat, q_pe, kv)]
    dense = jax.jit(lambda q, q_pe, kv: latent_attention_naive(
        q, q_pe, kv[..., :C], kv[..., C:], lengths_B=jnp.array([S, S]), sm_scale=SM_SCALE,
        causal=False))(*finite)
    assert_close_scaled(naive(*finite, every_BTS), dense, rel=1e-5)


@pytest.mark.parametrize("which,shape,message", [
    (2, (2, 16, 30), "kv_BSL has L=30, expected C \\+ R = 32 \\+ 8"),
    (3, (2, 2, 5), "indices_BTK has T=2 but q_latent_BTNC has T=1"),
    (1, (2, 1, 3, 8), "q_pe_BTNR has N=3 but q_latent_BTNC has N=4"),
    (3, (2, 5), r"indices_BTK must have 3 dims \[B,T,K\]"),
])
def test_bad_shapes_name_the_field(which, shape, message):
    args = [jnp.ones((2, 1, N, C)), jnp.ones((2, 1, N, R)), jnp.ones((2, 16, C + R)),
            jnp.zeros((2, 1, 5), jnp.int32)]
    args[which] = jnp.ones(shape, jnp.int32 if which == 3 else jnp.float32)
    with pytest.raises(ValueError, match=message):
        sparse_latent_attention_cache(*args, sm_scale=SM_SCALE, implementation="interpret")


def test_float_indices_and_bad_block_sizes_are_rejected():
    args = [jnp.ones((1, 1, N, C)), jnp.ones((1, 1, N, R)), jnp.ones((1, 16, C + R))]
    with pytest.raises(ValueError, match="indices_BTK must be integer"):
        sparse_latent_attention_cache(*args, jnp.zeros((1, 1, 4)), sm_scale=SM_SCALE)
    with pytest.raises(ValueError, match="block_k=64: the TPU kernel needs a multiple of 128"):
        sparse_latent_attention_cache(*args, jnp.zeros((1, 1, 4), jnp.int32), sm_scale=SM_SCALE,
                                      implementation="tpu_interpret",
                                      block_sizes=SparseLatentBlockSizes(block_k=64))
    with pytest.raises(ValueError, match="block_k=12 must be a multiple of 8"):
        SparseLatentBlockSizes(block_k=12)
    with pytest.raises(ValueError, match="vmem_limit_bytes=0 must be None or a positive int"):
        SparseLatentBlockSizes(vmem_limit_bytes=0)
