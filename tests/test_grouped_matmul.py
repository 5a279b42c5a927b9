"""The blocked grouped matmul equals a per-group loop and ragged_dot, forward and gradients."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mla_moe.grouped_matmul import block_rows, grouped_matmul


@pytest.mark.parametrize("sizes", [[5, 0, 17, 1, 0, 9], [32, 0, 0, 0, 0, 0], [1] * 6])
def test_blocked_equals_loop_and_ragged_dot(sizes):
    sizes = np.array(sizes, np.int32)
    m, e, d, f = int(sizes.sum()), len(sizes), 12, 7
    x = jax.random.normal(jax.random.key(0), (m, d))
    w = jax.random.normal(jax.random.key(1), (e, d, f))
    gs = jnp.asarray(sizes)
    bounds = np.concatenate([[0], np.cumsum(sizes)])

    def loop(x, w):
        return jnp.concatenate([x[bounds[g]:bounds[g + 1]] @ w[g] for g in range(e)])

    def loss(fn):
        return lambda x, w: jnp.sum(jnp.sin(fn(x, w)))

    blocked = jax.jit(lambda x, w: grouped_matmul(x, w, gs, implementation="blocked"))
    ragged = jax.jit(lambda x, w: grouped_matmul(x, w, gs, implementation="ragged_dot"))
    np.testing.assert_allclose(blocked(x, w), loop(x, w), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ragged(x, w), loop(x, w), rtol=1e-5, atol=1e-5)
    g_blocked = jax.grad(loss(blocked), argnums=(0, 1))(x, w)
    g_loop = jax.grad(loss(loop), argnums=(0, 1))(x, w)
    chex.assert_trees_all_close(g_blocked, g_loop, rtol=1e-5, atol=1e-5)


def test_rows_past_the_groups_are_zero():
    x = jax.random.normal(jax.random.key(0), (10, 4))
    w = jax.random.normal(jax.random.key(1), (2, 4, 3))
    gs = jnp.array([3, 4])
    y = grouped_matmul(x, w, gs, implementation="blocked")
    np.testing.assert_allclose(y, grouped_matmul(x, w, gs, implementation="ragged_dot"),
                               rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(y[7:]).max()) == 0.0


def test_block_rows_and_bad_implementation():
    assert block_rows(8192, 16) == 128 and block_rows(64, 64) == 8 and block_rows(2048, 8) == 64
    with pytest.raises(ValueError, match="implementation"):
        grouped_matmul(jnp.ones((2, 3)), jnp.ones((1, 3, 4)), jnp.array([2]),
                       implementation="dense")
