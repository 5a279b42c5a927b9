"""pallas_kernels.latent_attention (absorbed MLA decode) vs the dense oracle and the chunked
XLA reference, in Pallas interpret mode on CPU.

Legend: B batch, T query len, S cache slots, N heads, C kv latent rank, R rope dim.
Cache slots at or beyond each sequence's length hold NaN / inf, so any read of garbage into a
result shows up. Tolerances, per array: max|diff| <= rel * max|expected| with rel 1e-5 in f32
(measured: 4e-7) and 2e-2 in bf16 (measured: 3e-3).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerance import assert_close_scaled

from pallas_kernels import (
    LatentBlockSizes,
    latent_attention,
    latent_attention_cache,
    latent_attention_naive,
    latent_attention_reference,
)

SM_SCALE = 0.2
N, C, R = 4, 32, 8
# 3 splits over the cache, several kv blocks per split, several row blocks.
SMALL_BLOCKS = LatentBlockSizes(block_kv=16, block_rows=8, num_splits=3, block_kv_xla=16)
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
POOL = 1 << 14
# The CPU backend's LLVM optimisation only costs compile time here; numerics are unchanged.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _normal(key, shape):
    """N(0, 1) from one fixed-size draw: jax.random compiles once per process, not per shape."""
    flat = np.asarray(jax.random.normal(key, (POOL,), jnp.float32))
    return flat[: int(np.prod(shape))].reshape(shape)


def _inputs(seed, lengths, t, s, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 4)
    b = len(lengths)
    q_lat, q_pe, kv, k_pe = [_normal(k, shp) for k, shp in
                             zip(keys, [(b, t, N, C), (b, t, N, R), (b, s, C), (b, s, R)])]
    valid_BS1 = (np.arange(s)[None, :] < np.asarray(lengths)[:, None])[..., None]
    kv = np.where(valid_BS1, kv, np.nan)  # garbage past the length must never be read
    k_pe = np.where(valid_BS1, k_pe, np.inf)
    args = tuple(jnp.asarray(x.astype(dtype)) for x in (q_lat, q_pe, kv, k_pe))
    return args, jnp.asarray(lengths, jnp.int32)


def _run(fn, args, lengths_B):
    return jax.jit(fn).lower(args, lengths_B).compile(FAST_COMPILE)(args, lengths_B)


def _assert_close(actual, expected, dtype):
    tol = TOL[dtype]
    a, e = np.asarray(actual).astype(np.float32), np.asarray(expected).astype(np.float32)
    chex.assert_equal_shape([a, e])
    chex.assert_tree_all_finite(a)
    assert_close_scaled(a, e, rel=tol)


# Lengths: full cache, shorter than one kv block, mid-block, 1 (< T for T = 2, 7: rows that
# see nothing must come out 0).
RAGGED = (80, 5, 37, 1)

CASES = [
    pytest.param(1, RAGGED, 1, 80, True, jnp.float32, "interpret", SMALL_BLOCKS, id="T1"),
    pytest.param(3, RAGGED, 7, 80, True, jnp.float32, "interpret", SMALL_BLOCKS, id="T7"),
    pytest.param(4, RAGGED, 7, 80, False, jnp.float32, "interpret", SMALL_BLOCKS,
                 id="T7-noncausal"),
    pytest.param(5, (75, 3, 40), 2, 75, True, jnp.float32, "interpret", SMALL_BLOCKS,
                 id="T2-S-not-multiple"),
    pytest.param(6, RAGGED, 2, 80, True, jnp.bfloat16, "interpret", SMALL_BLOCKS, id="T2-bf16"),
    pytest.param(7, (80, 17), 1, 80, True, jnp.float32, "interpret", None, id="T1-default"),
    pytest.param(8, RAGGED, 1, 80, True, jnp.float32, "tpu_interpret", SMALL_BLOCKS,
                 id="tpu-T1"),
    pytest.param(9, RAGGED, 7, 80, True, jnp.bfloat16, "tpu_interpret", SMALL_BLOCKS,
                 id="tpu-T7-bf16"),
    pytest.param(10, (75, 3, 40), 2, 75, False, jnp.float32, "tpu_interpret", SMALL_BLOCKS,
                 id="tpu-T2-noncausal-S-not-multiple"),
    # One sequence: two splits by default (one per TensorCore), the second past the length.
    pytest.param(11, (30,), 1, 80, True, jnp.float32, "tpu_interpret",
                 LatentBlockSizes(block_kv=16, block_rows=8, block_kv_xla=16),
                 id="tpu-T1-one-sequence-default-splits"),
]


@pytest.mark.parametrize("seed,lengths,t,s,causal,dtype,implementation,block_sizes", CASES)
def test_kernel_matches_oracle_and_reference(seed, lengths, t, s, causal, dtype,
                                             implementation, block_sizes):
    args, lengths_B = _inputs(seed, lengths, t, s, dtype)
    kw = dict(sm_scale=SM_SCALE, causal=causal)
    out = _run(lambda a, l: latent_attention(*a, lengths_B=l, **kw, block_sizes=block_sizes,
                                             implementation=implementation), args, lengths_B)
    chex.assert_shape(out, (len(lengths), t, N, C))
    assert out.dtype == dtype
    naive = _run(lambda a, l: latent_attention_naive(*a, lengths_B=l, **kw), args, lengths_B)
    reference = _run(lambda a, l: latent_attention_reference(*a, lengths_B=l, **kw, block_kv=16),
                     args, lengths_B)
    _assert_close(out, naive, dtype)
    _assert_close(out, reference, dtype)
    for b, length in enumerate(lengths):  # causal: query t sits at length - T + t
        if causal and length < t:
            assert not np.asarray(out)[b, : t - length].any()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("t", [1, 2, 7])
def test_xla_reference_matches_oracle(t, causal):
    args, lengths_B = _inputs(20 + t, RAGGED, t, 80)
    kw = dict(sm_scale=SM_SCALE, causal=causal)
    got = _run(lambda a, l: latent_attention(*a, lengths_B=l, **kw, implementation="xla",
                                             block_sizes=SMALL_BLOCKS), args, lengths_B)
    want = _run(lambda a, l: latent_attention_naive(*a, lengths_B=l, **kw), args, lengths_B)
    _assert_close(got, want, jnp.float32)


def test_decode_matches_full_attention_rows():
    """Decode semantics: T queries at the end of a length-L sequence equal the last T rows of
    causal attention over the L tokens (MQA with K = [c; k_pe], V = c)."""
    args, lengths_B = _inputs(30, (24,), 3, 24)
    q_lat, q_pe, kv, k_pe = args
    out = latent_attention(*args, lengths_B=lengths_B, sm_scale=SM_SCALE,
                           implementation="interpret", block_sizes=SMALL_BLOCKS)
    s_BTNS = (jnp.einsum("BTNC,BSC->BTNS", q_lat, kv)
              + jnp.einsum("BTNR,BSR->BTNS", q_pe, k_pe)) * SM_SCALE
    pos_T1 = jnp.arange(21, 24)[:, None]
    s_BTNS = jnp.where((jnp.arange(24)[None, :] <= pos_T1)[None, :, None, :], s_BTNS, -jnp.inf)
    want = jnp.einsum("BTNS,BSC->BTNC", jax.nn.softmax(s_BTNS, axis=-1), kv)
    _assert_close(out, want, jnp.float32)


def test_empty_sequence_gives_zeros():
    args, lengths_B = _inputs(31, (0, 9), 2, 32)
    out = latent_attention(*args, lengths_B=lengths_B, sm_scale=SM_SCALE,
                           implementation="interpret", block_sizes=SMALL_BLOCKS)
    chex.assert_trees_all_equal(out[0], jnp.zeros_like(out[0]))
    chex.assert_tree_all_finite(out)


@pytest.mark.parametrize("which,shape,message", [
    (2, (2, 16, 30), "kv_latent_BSC has C=30 but q_latent_BTNC has C=32"),
    (3, (2, 15, 8), "k_pe_BSR has S=15 but kv_latent_BSC has S=16"),
    (3, (2, 16, 4), "k_pe_BSR has R=4 but q_pe_BTNR has R=8"),
    (1, (2, 1, 3, 8), "q_pe_BTNR has N=3 but q_latent_BTNC has N=4"),
    (4, (3,), "lengths_B has B=3 but q_latent_BTNC has B=2"),
    (2, (2, 16), r"kv_latent_BSC must have 3 dims \[B,S,C\]"),
])
def test_bad_shapes_name_the_dim(which, shape, message):
    args, lengths_B = _inputs(32, (16, 4), 1, 16)
    args = [*args, lengths_B]
    args[which] = jnp.ones(shape, jnp.int32 if which == 4 else jnp.float32)
    with pytest.raises(ValueError, match=message):
        latent_attention(*args[:4], lengths_B=args[4], sm_scale=SM_SCALE,
                         implementation="interpret")


@pytest.mark.parametrize("kwargs,message", [
    (dict(block_kv=0), "block_kv=0 must be a positive int"),
    (dict(block_rows=20), "block_rows=20 must be a multiple of 8"),
    (dict(num_splits=0), "num_splits=0 must be None or a positive int"),
    (dict(block_kv_xla=-16), "block_kv_xla=-16 must be a positive int"),
])
def test_block_sizes_validate(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LatentBlockSizes(**kwargs)


@pytest.mark.parametrize("implementation", ["tpu_interpret", "interpret"])
def test_packed_cache_equals_the_two_arrays(implementation):
    """latent_attention_cache over [B, S, C + R] (read in place on TPU) = latent_attention."""
    args, lengths_B = _inputs(12, RAGGED, 2, 80, jnp.float32)
    q_lat, q_pe, kv, k_pe = args
    kw = dict(sm_scale=SM_SCALE, block_sizes=SMALL_BLOCKS, implementation=implementation)
    packed = _run(lambda a, l: latent_attention_cache(  # noqa: E731
        a[0], a[1], jnp.concatenate([a[2], a[3]], axis=-1), lengths_B=l, **kw), args, lengths_B)
    split = _run(lambda a, l: latent_attention(*a, lengths_B=l, **kw), args, lengths_B)
    _assert_close(packed, split, jnp.float32)  # same math; the TPU form multiplies slot-minor
