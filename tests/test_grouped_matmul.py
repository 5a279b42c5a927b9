"""The grouped SwiGLU (blocked scan and ragged_dot) equals a per-row loop, forward and
gradients; its layout is the stable sort by expert, padded per group."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerance import assert_close_scaled

from mla_moe.grouped_matmul import block_rows, grouped_swiglu, layout, permute_rows

E, D, F = 6, 12, 7


def _weights(seed=1):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(k1, (E, D, F)), jax.random.normal(k2, (E, D, F)),
            jax.random.normal(k3, (E, F, D)))


def _loop(x_TD, experts_TK, weights_TK, gate, up, down):
    """One token at a time, each expert's weights indexed directly; expert E -> nothing."""
    rows = []
    for t in range(experts_TK.shape[0]):
        y = jnp.zeros((D,))
        for k in range(experts_TK.shape[1]):
            e = int(experts_TK[t, k])
            if e < E:
                h = jax.nn.silu(x_TD[t] @ gate[e]) * (x_TD[t] @ up[e])
                y = y + weights_TK[t, k] * (h @ down[e])
        rows.append(y)
    return jnp.stack(rows)


def _experts(kind):
    rng = np.random.default_rng(0)
    if kind == "top3":  # distinct experts per row, uneven loads
        return np.stack([rng.choice(E, 3, replace=False, p=[.4, .3, .1, .1, .1, 0])
                         for _ in range(11)])
    if kind == "one_expert":
        return np.full((9, 1), 2)
    if kind == "with_empty_rows":  # E marks a row with no expert
        return np.array([[0], [E], [5], [5], [E], [1], [0]])
    raise ValueError(kind)


# (implementation, fuse_gate_up): the blocked scan with gate and up as one [D, 2F] operand
# and as two, and ragged_dot.
IMPLS = [("blocked", True), ("blocked", False), ("ragged_dot", None)]


@pytest.mark.parametrize("kind", ["top3", "one_expert", "with_empty_rows"])
@pytest.mark.parametrize("impl,fuse", IMPLS)
def test_grouped_swiglu_equals_loop(kind, impl, fuse):
    experts = jnp.asarray(_experts(kind), jnp.int32)
    x = jax.random.normal(jax.random.key(0), (experts.shape[0], D))
    gates = jax.random.uniform(jax.random.key(2), experts.shape)
    w = _weights()

    def fast(x, e, *a):
        return grouped_swiglu(x, e, *a, implementation=impl, fuse_gate_up=fuse)

    assert_close_scaled(jax.jit(fast)(x, experts, gates, *w), _loop(x, experts, gates, *w),
                        rel=2e-6)  # measured: 2e-7

    def loss(fn):
        return lambda x, g, *w: jnp.sum(jnp.sin(fn(x, experts, g, *w)))

    g_fast = jax.grad(loss(fast), argnums=(0, 1, 2, 3, 4))(x, gates, *w)
    g_loop = jax.grad(loss(_loop), argnums=(0, 1, 2, 3, 4))(x, gates, *w)
    # Measured: 9e-6 (the x and gate gradients with empty rows, ragged_dot).
    assert_close_scaled(g_fast, g_loop, rel=5e-5)


def test_no_weights_means_ones():
    experts = jnp.asarray(_experts("with_empty_rows"), jnp.int32)
    x = jax.random.normal(jax.random.key(0), (experts.shape[0], D))
    assert_close_scaled(grouped_swiglu(x, experts, None, *_weights()),
                        _loop(x, experts, jnp.ones(experts.shape), *_weights()), rel=2e-6)


def test_layout_is_the_padded_stable_sort():
    experts = jnp.asarray(_experts("top3"), jnp.int32)
    m = experts.size
    flat = np.asarray(experts).reshape(-1)
    for block in (1, 4):
        lay = layout(experts, E, block)
        dest, src = np.asarray(lay.dest_M), np.asarray(lay.src_M)
        np.testing.assert_array_equal(src[dest], np.arange(m))  # inverse bijections
        assert (src == m).sum() == src.size - m  # every other slot is padding
        np.testing.assert_array_equal(lay.sizes_E, np.bincount(flat, minlength=E))
        used_slots = src[src < m]
        np.testing.assert_array_equal(used_slots, np.argsort(flat, stable=True))  # stable
        for e in range(E):  # each group starts on a block boundary, its blocks tagged e
            rows = np.nonzero(flat == e)[0]
            if len(rows):
                start = dest[rows].min()
                assert start % block == 0 and (lay.group_O[start // block] == e)
        assert int(lay.used) * block == sum(-(-c // block) * block for c in lay.sizes_E)


def test_permute_rows_gradient_is_the_inverse_gather():
    x = jax.random.normal(jax.random.key(0), (5, 3))
    idx = jnp.array([4, 9, 0, 2, 9, 1, 3])  # 9: padding slot
    inv = jnp.array([2, 5, 3, 6, 0])
    g_fast = jax.grad(lambda x: jnp.sum(jnp.cos(permute_rows(x, idx, inv))))(x)
    g_ref = jax.grad(lambda x: jnp.sum(jnp.cos(x.at[idx].get(mode="fill", fill_value=0))))(x)
    np.testing.assert_array_equal(g_fast, g_ref)  # the same adds


def test_block_rows_and_bad_implementation():
    assert block_rows(8192, 16) == 128 and block_rows(64, 64) == 8 and block_rows(2048, 8) == 128
    with pytest.raises(ValueError, match="implementation"):
        grouped_swiglu(jnp.ones((2, D)), jnp.zeros((2, 1), jnp.int32), None, *_weights(),
                       implementation="dense")


@pytest.mark.parametrize("fuse", [True, False])
def test_bfloat16_inputs_keep_their_dtype_in_gradients(fuse):
    experts = jnp.asarray(_experts("top3"), jnp.int32)
    x = jax.random.normal(jax.random.key(0), (experts.shape[0], D))
    gates = jax.random.uniform(jax.random.key(2), experts.shape)
    w = _weights()
    bf = [a.astype(jnp.bfloat16) for a in (x, *w)]

    def loss(x, g, *w):
        return jnp.sum(jnp.sin(grouped_swiglu(x, experts, g, *w, implementation="blocked",
                                              fuse_gate_up=fuse)))

    grads = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(bf[0], gates, *bf[1:])
    assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.float32] + [jnp.bfloat16] * 3
    y = grouped_swiglu(bf[0], experts, gates, *bf[1:], implementation="blocked",
                       fuse_gate_up=fuse)
    assert_close_scaled(y, _loop(x, experts, gates, *w), rel=2e-2)  # bf16: 3.5e-3
