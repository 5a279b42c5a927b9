"""pallas_kernels.mla_attention vs the dense oracle and the chunked XLA reference.

Legend: B batch, T query len, S key len, N heads, H qk nope dim, R rope dim, V value dim.
Kernels run in Pallas interpret mode on CPU (GPU layout: "interpret"; TPU layout and
SMEM/VMEM simulation: "tpu_interpret"). Shapes are tiny because interpret mode is slow.

Tolerances, per array: max|diff| <= rel * max|expected| with rel 1e-5 in f32 and 2e-2 in
bf16, the oracle computing in f32 from the same bf16 inputs.

Explicit positions (`q_positions`, `k_positions`) are tested in the layout of context
parallelism (zigzag): a shard's queries are two chunks of the sequence far apart.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerance import assert_close_scaled

from pallas_kernels import (
    MLABlockSizes,
    mla_attention,
    mla_attention_naive,
    mla_attention_reference,
    resolve,
)

SM_SCALE = 0.3
POOL = 1 << 14
# The CPU backend's LLVM optimisation only costs compile time here (interpret-mode kernels are
# compile-bound at these sizes); numerics are unchanged.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
# Mixed tiles so that every kernel loops over several blocks and T, S are not multiples.
SMALL_BLOCKS = MLABlockSizes(block_q=8, block_kv=8, block_q_dq=8, block_kv_dq=16,
                             block_q_dkv=16, block_kv_dkv=8, block_kv_xla=8)
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _normal(key, shape, dtype):
    """N(0, 1) from one fixed-size draw: jax.random compiles once per process, not per shape."""
    flat = np.asarray(jax.random.normal(key, (POOL,), jnp.float32))
    return jnp.asarray(flat[: int(np.prod(shape))].reshape(shape).astype(dtype))


def _inputs(seed, b, t, s, n=2, h=16, r=8, v=12, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 6)
    shapes = [(b, t, n, h), (b, t, n, r), (b, s, n, h), (b, s, r), (b, s, n, v)]
    args = [_normal(k, shp, dtype) for k, shp in zip(keys, shapes)]
    return args, _normal(keys[5], (b, t, n, v), dtype)


def _assert_close(actual, expected, dtype):
    tol = TOL[dtype]
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        a, e = np.asarray(a).astype(np.float32), np.asarray(e).astype(np.float32)
        chex.assert_equal_shape([a, e])
        chex.assert_tree_all_finite(a)
        assert_close_scaled(a, e, rel=tol)


def _fwd_and_vjp(fn, args, do_BTNV):
    """Output and the cotangents of all five inputs, as one compiled program."""

    def fwd_and_vjp(args, do_BTNV):
        out_BTNV, vjp = jax.vjp(fn, *args)
        return out_BTNV, vjp(do_BTNV)

    return jax.jit(fwd_and_vjp).lower(args, do_BTNV).compile(FAST_COMPILE)(args, do_BTNV)


def _segments(seed, b, t, s, same=False):
    """Packed documents: sorted random ids; id 7 only on the query side (rows see nothing)."""
    rng = np.random.default_rng(seed)
    q = np.sort(rng.integers(0, 3, size=(b, t)), axis=1)
    if same:
        return jnp.asarray(q, jnp.int32)
    kv = np.sort(rng.integers(0, 3, size=(b, s)), axis=1)
    q[0, :2] = 7
    return jnp.asarray(q, jnp.int32), jnp.asarray(kv, jnp.int32)


# (seed, B, T, S, causal, segments, dtype, implementation)
KERNEL_CASES = [
    pytest.param(1, 2, 13, 13, True, None, jnp.float32, "interpret", id="causal-f32"),
    pytest.param(4, 2, 9, 19, False, "pair", jnp.float32, "interpret", id="full-pair-TneS-f32"),
    pytest.param(6, 1, 19, 11, True, None, jnp.float32, "interpret", id="causal-T>S-f32"),
    pytest.param(7, 1, 10, 23, True, "pair", jnp.float32, "interpret", id="causal-pair-T<S-f32"),
    pytest.param(8, 2, 21, 21, True, None, jnp.bfloat16, "interpret", id="causal-bf16"),
    pytest.param(9, 1, 11, 17, False, "pair", jnp.bfloat16, "interpret", id="full-pair-bf16"),
    pytest.param(10, 1, 21, 21, True, "same", jnp.float32, "tpu_interpret",
                 id="tpu-causal-packed-f32"),
    pytest.param(11, 1, 9, 19, False, "pair", jnp.bfloat16, "tpu_interpret",
                 id="tpu-full-pair-bf16"),
    pytest.param(12, 2, 35, 13, True, None, jnp.float32, "tpu_interpret", id="tpu-causal-T>S-f32"),
    pytest.param(13, 1, 19, 41, True, "pair", jnp.bfloat16, "tpu_interpret",
                 id="tpu-causal-pair-T<S-bf16"),
]


@pytest.mark.parametrize("seed,b,t,s,causal,segments,dtype,implementation", KERNEL_CASES)
def test_kernel_matches_oracle_and_reference(seed, b, t, s, causal, segments, dtype,
                                             implementation):
    args, do_BTNV = _inputs(seed, b, t, s, dtype=dtype)
    seg = None if segments is None else _segments(seed, b, t, s, same=segments == "same")
    kw = dict(sm_scale=SM_SCALE, causal=causal, segment_ids=seg)
    kernel = lambda *a: mla_attention(*a, **kw, implementation=implementation,  # noqa: E731
                                      block_sizes=SMALL_BLOCKS)
    out, grads = _fwd_and_vjp(kernel, args, do_BTNV)
    chex.assert_shape(out, (b, t, 2, 12))
    assert out.dtype == dtype and len(grads) == 5
    oracle = _fwd_and_vjp(lambda *a: mla_attention_naive(*a, **kw), args, do_BTNV)
    reference = _fwd_and_vjp(
        lambda *a: mla_attention_reference(*a, **kw, block_kv=8), args, do_BTNV)
    _assert_close((out, grads), oracle, dtype)
    _assert_close((out, grads), reference, dtype)
    if segments == "pair":  # rows whose segment has no key: exactly zero, gradient too
        assert not np.asarray(out)[0, :2].any()
        assert not np.asarray(grads[0])[0, :2].any()
    if causal and t > s:  # the first T - S queries precede every key
        assert not np.asarray(out)[:, : t - s].any()


def test_causal_convention_queries_are_last_positions():
    """Attention of the last T queries over S keys == the last T rows of the T == S case."""
    args, _ = _inputs(20, 1, 19, 19)
    full = mla_attention(*args, sm_scale=SM_SCALE, implementation="xla")
    q_last = [x[:, -7:] for x in args[:2]]
    kw = dict(sm_scale=SM_SCALE, block_sizes=SMALL_BLOCKS)
    for implementation in ("xla", "interpret"):
        last = mla_attention(*q_last, *args[2:], **kw, implementation=implementation)
        _assert_close(last, full[:, -7:], jnp.float32)


def test_single_segment_array_equals_pair():
    args, _ = _inputs(21, 2, 12, 12)
    seg = _segments(21, 2, 12, 12, same=True)
    one = mla_attention(*args, sm_scale=SM_SCALE, segment_ids=seg, implementation="xla",
                        block_sizes=SMALL_BLOCKS)
    pair = mla_attention(*args, sm_scale=SM_SCALE, segment_ids=(seg, seg),
                         implementation="xla", block_sizes=SMALL_BLOCKS)
    chex.assert_trees_all_equal(one, pair)


@pytest.mark.parametrize("t,s,segments,causal", [
    (13, 13, None, True), (9, 30, "pair", False), (30, 9, None, True), (16, 16, "same", True)])
def test_xla_reference_matches_oracle(t, s, segments, causal):
    args, do_BTNV = _inputs(30 + t + s, 2, t, s)
    seg = None if segments is None else _segments(t, 2, t, s, same=segments == "same")
    kw = dict(sm_scale=SM_SCALE, causal=causal, segment_ids=seg)
    got = _fwd_and_vjp(lambda *a: mla_attention(*a, **kw, implementation="xla",
                                                block_sizes=SMALL_BLOCKS), args, do_BTNV)
    want = _fwd_and_vjp(lambda *a: mla_attention_naive(*a, **kw), args, do_BTNV)
    _assert_close(got, want, jnp.float32)


def test_auto_implementation_is_xla_on_cpu():
    assert resolve(None) == resolve("auto") == "xla"
    with pytest.raises(ValueError, match="implementation='cuda'"):
        resolve("cuda")


@pytest.mark.parametrize("which,shape,message", [
    (3, (2, 6, 8), "k_pe_BSR has S=6 but k_nope_BSNH has S=5"),
    (3, (2, 5, 4), "k_pe_BSR has R=4 but q_pe_BTNR has R=8"),
    (2, (2, 5, 3, 16), "k_nope_BSNH has N=3 but q_nope_BTNH has N=2"),
    (2, (2, 5, 2, 8), "k_nope_BSNH has H=8 but q_nope_BTNH has H=16"),
    (4, (2, 6, 2, 12), "v_BSNV has S=6 but k_nope_BSNH has S=5"),
    (1, (2, 4, 2, 8), "q_pe_BTNR has T=4 but q_nope_BTNH has T=3"),
    (4, (3, 5, 2, 12), "v_BSNV has B=3 but q_nope_BTNH has B=2"),
    (3, (2, 5, 1, 8), r"k_pe_BSR must have 3 dims \[B,S,R\]"),
])
def test_bad_shapes_name_the_dim(which, shape, message):
    args, _ = _inputs(40, 2, 3, 5)
    args[which] = jnp.ones(shape, jnp.float32)
    with pytest.raises(ValueError, match=message):
        mla_attention(*args, sm_scale=SM_SCALE, implementation="interpret")


def test_bad_segment_ids():
    args, _ = _inputs(41, 2, 3, 5)
    with pytest.raises(ValueError, match="needs T == S, got T=3, S=5"):
        mla_attention(*args, sm_scale=SM_SCALE, segment_ids=jnp.zeros((2, 3), jnp.int32))
    with pytest.raises(ValueError, match=r"kv segment ids have shape \(2, 4\), expected"):
        mla_attention(*args, sm_scale=SM_SCALE,
                      segment_ids=(jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 4), jnp.int32)))


@pytest.mark.parametrize("field,value,message", [
    ("block_q", 0, "block_q=0 must be a positive int"),
    ("block_kv", 12, "block_kv=12 must be a multiple of 8"),
    ("block_q_dkv", -8, "block_q_dkv=-8 must be a positive int"),
    ("num_warps_fwd", 0, "num_warps_fwd=0 must be a positive int"),
])
def test_block_sizes_validate(field, value, message):
    with pytest.raises(ValueError, match=message):
        MLABlockSizes(**{field: value})


def test_gpu_blocks_must_be_powers_of_two():
    args, _ = _inputs(42, 1, 64, 64)
    with pytest.raises(ValueError, match="block_kv=24: the GPU kernel needs a power of two"):
        mla_attention(*args, sm_scale=SM_SCALE, implementation="gpu",
                      block_sizes=MLABlockSizes(block_kv=24))


# --- explicit positions: the zigzag layout of context parallelism -----------------------------
def _zigzag_order(length, context):
    """[length] sequence positions in the zigzag layout: shard i holds chunks i, 2C - 1 - i."""
    chunk = length // (2 * context)
    chunks = [c for i in range(context) for c in (i, 2 * context - 1 - i)]
    return np.concatenate([np.arange(c * chunk, (c + 1) * chunk) for c in chunks])


def _shard_positions(s, context, shard, keys_zigzag):
    """(q_positions of one shard's T = S / context queries, k_positions of all S keys)."""
    order = _zigzag_order(s, context)
    t = s // context
    k_pos = order if keys_zigzag else np.arange(s)
    return jnp.asarray(order[shard * t:(shard + 1) * t], jnp.int32), jnp.asarray(k_pos, jnp.int32)


# (seed, S, context, shard, keys in the zigzag layout too, dtype, implementation). S = 40,
# context 2: shard 0's queries sit at 0..9 and 30..39, so with 8-row blocks the first query
# block sees one key block of the keys in sequence order and the second query block mixes the
# two chunks. Keys in the zigzag layout do not increase along S (the general case of the
# block bounds: blocks are fetched that are then skipped).
POSITION_CASES = [
    pytest.param(50, 40, 2, 0, False, jnp.float32, "interpret", id="shard0-f32"),
    pytest.param(52, 40, 2, 0, True, jnp.bfloat16, "tpu_interpret",
                 id="tpu-shard0-zigzag-keys-bf16"),
]


@pytest.mark.parametrize("seed,s,context,shard,keys_zigzag,dtype,implementation",
                         POSITION_CASES)
def test_kernel_with_positions_matches_oracle_and_reference(seed, s, context, shard,
                                                            keys_zigzag, dtype, implementation):
    t = s // context
    args, do_BTNV = _inputs(seed, 1, t, s, dtype=dtype)
    q_pos_T, k_pos_S = _shard_positions(s, context, shard, keys_zigzag)
    kw = dict(sm_scale=SM_SCALE, segment_ids=_segments(seed, 1, t, s), q_positions=q_pos_T,
              k_positions=k_pos_S)
    kernel = lambda *a: mla_attention(*a, **kw, implementation=implementation,  # noqa: E731
                                      block_sizes=SMALL_BLOCKS)
    out, grads = _fwd_and_vjp(kernel, args, do_BTNV)
    chex.assert_shape(out, (1, t, 2, 12))
    oracle = _fwd_and_vjp(lambda *a: mla_attention_naive(*a, **kw), args, do_BTNV)
    reference = _fwd_and_vjp(
        lambda *a: mla_attention_reference(*a, **kw, block_kv=8), args, do_BTNV)
    _assert_close((out, grads), oracle, dtype)
    _assert_close(reference, oracle, dtype)


def test_positions_pick_rows_of_full_causal_attention():
    """A shard's queries at their positions, over the keys in either order, are the rows of
    the whole sequence's causal attention (T == S) at those positions; explicit default
    positions change nothing."""
    s = 24
    args, _ = _inputs(53, 1, s, s)

    @jax.jit
    def rows_and_full(args):
        rows = []
        for keys_zigzag in (False, True):
            q_pos_T, k_pos_S = _shard_positions(s, 2, 0, keys_zigzag)
            q = [x[:, q_pos_T] for x in args[:2]]
            kv = [x[:, k_pos_S] for x in args[2:]]
            rows.append(mla_attention_naive(*q, *kv, sm_scale=SM_SCALE, q_positions=q_pos_T,
                                            k_positions=k_pos_S))
        full = mla_attention_naive(*args, sm_scale=SM_SCALE)
        return rows, full

    rows, full = rows_and_full(args)
    q_pos_T, _ = _shard_positions(s, 2, 0, False)
    _assert_close(rows, [full[:, q_pos_T]] * 2, jnp.float32)
    reference = jax.jit(lambda args, **kw: mla_attention_reference(
        *args, sm_scale=SM_SCALE, block_kv=8, **kw))
    chex.assert_trees_all_equal(
        reference(args, q_positions=jnp.arange(s), k_positions=jnp.arange(s)), reference(args))


def test_bad_positions():
    args, _ = _inputs(54, 2, 3, 5)
    with pytest.raises(ValueError, match="only apply to causal attention"):
        mla_attention(*args, sm_scale=SM_SCALE, causal=False, q_positions=jnp.arange(3))
    with pytest.raises(ValueError, match=r"k_positions has shape \(4,\), expected \[5\]"):
        mla_attention(*args, sm_scale=SM_SCALE, k_positions=jnp.arange(4))
    with pytest.raises(ValueError, match="q_positions must be integers"):
        mla_attention(*args, sm_scale=SM_SCALE, q_positions=jnp.zeros(3))
