"""The megablox grouped SwiGLU (Pallas interpret mode on CPU) equals ragged_dot and a dense
per-expert loop, forward and gradients w.r.t. x, the routing weights and the three weight
tensors: uneven groups, an empty expert, assignments with no expert, a row count that is not
a multiple of the row tile, several contraction and column tiles, partial ones included;
float32 and bfloat16; and once at the tiles megablox uses on TPU. The chunked form (rows sorted
once, each chunk of experts run over its own groups' rows) equals the same loop for every chunk
size."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerance import assert_close_scaled

from mla_moe import megablox
from mla_moe.grouped_matmul import grouped_swiglu, layout
from mla_moe.megablox import megablox_swiglu
from mla_moe.megablox_chunked import chunked_megablox_swiglu

E, D, F = 6, 80, 48
T, K = 13, 3  # 39 assignments: 5 row tiles of 8, the last one partly padding
# (rows, contraction, columns), for bf16; f32 halves the last two. D = 80 is 3 tiles of 32 (5
# of 16), the last one partial: megablox masks the contraction; F = 48 is two (three), the
# last one's columns past F dropped.
TILING = (8, 32, 32)


def _routing():
    """Top-3 experts per token, distinct; expert 5 gets no row; E (no expert) appears."""
    rng = np.random.default_rng(0)
    p = np.array([.3, .2, .1, .1, .1, 0, .2])  # the last: E, no expert
    experts = np.stack([rng.choice(E + 1, K, replace=False, p=p) for _ in range(T)])
    experts[4] = E  # a token with no expert at all
    gates = jax.random.uniform(jax.random.key(2), (T, K), minval=0.1)
    return jnp.asarray(experts, jnp.int32), gates


def _inputs(dtype):
    k = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(k[0], (T, D))
    w = (jax.random.normal(k[1], (E, D, F)) * D**-0.5, jax.random.normal(k[2], (E, D, F)) * D**-0.5,
         jax.random.normal(k[3], (E, F, D)) * F**-0.5)
    return [a.astype(dtype) for a in (x, *w)]


def _dense_loop(x_TD, experts_TK, weights_TK, gate, up, down):
    """Every token through every expert, f32, masked by the routing: a loop over experts."""
    f32 = jnp.float32
    x_TD, gate, up, down = (a.astype(f32) for a in (x_TD, gate, up, down))
    y_TD = jnp.zeros((x_TD.shape[0], down.shape[-1]), f32)
    for e in range(gate.shape[0]):
        w_T = jnp.sum(jnp.where(experts_TK == e, weights_TK, 0), axis=1)
        h_TF = jax.nn.silu(x_TD @ gate[e]) * (x_TD @ up[e])
        y_TD = y_TD + w_T[:, None] * (h_TF @ down[e])
    return y_TD


def _value_and_grads(fn, experts, gates, x, *w):
    """fn's output and the gradients of sum(sin(out)) w.r.t. x, gates, gate, up, down."""
    def run(x, g, *w):
        y, vjp = jax.vjp(lambda *a: fn(a[0], experts, *a[1:]), x, g, *w)
        return y, vjp(jnp.cos(y))

    return jax.jit(run)(x, gates, *w)


def _megablox(x, e, g, *w):
    return grouped_swiglu(x, e, g, *w, implementation="megablox", interpret=True,
                          tiling=TILING)


def _ragged(x, e, g, *w):
    return grouped_swiglu(x, e, g, *w, implementation="ragged_dot")


def test_float32_equals_ragged_dot_and_the_loop():
    experts, gates = _routing()
    args = _inputs(jnp.float32)
    got = _value_and_grads(_megablox, experts, gates, *args)
    # Measured: 9.3e-7 (the down weights' gradient) against either.
    assert_close_scaled(got, _value_and_grads(_ragged, experts, gates, *args), rel=5e-6)
    assert_close_scaled(got, _value_and_grads(_dense_loop, experts, gates, *args), rel=5e-6)
    assert float(jnp.abs(got[0][4]).max()) == 0  # the token with no expert
    assert float(jnp.abs(got[1][2][5]).max()) == 0  # the empty expert's gate gradient


def test_bfloat16_outputs_and_gradients_keep_their_dtype():
    experts, gates = _routing()
    args = _inputs(jnp.bfloat16)
    y, grads = _value_and_grads(_megablox, experts, gates, *args)
    assert y.dtype == jnp.float32
    assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.float32] + [jnp.bfloat16] * 3
    # Against ragged_dot on the same bf16 inputs (its products also round to bf16) and the
    # f32 loop on the same (bf16-rounded) values: bf16 rounding of the products and of the
    # gradients. Measured: 7e-3 (y, against the loop), 1.5e-2 (the down weights' gradient,
    # against the loop; 9e-3 against ragged_dot): about two bf16 ulps of the largest entry.
    ragged = _value_and_grads(_ragged, experts, gates, *args)
    loop = _value_and_grads(_dense_loop, experts, gates, *(a.astype(jnp.float32) for a in args))
    f32 = jax.tree.map(lambda a: a.astype(jnp.float32), (y, grads))
    assert_close_scaled(f32, jax.tree.map(lambda a: a.astype(jnp.float32), ragged), rel=3e-2)
    assert_close_scaled(f32, loop, rel=3e-2)


def test_production_tiles():
    """bfloat16 (V3's dtype, for which megablox keeps its tiles whole) at megablox's own
    tiling (`default_tiling`, as on TPU): D and F one contraction / column tile each, and
    T*K = 600 assignments over 3 uneven experts, so two 512-row tiles with a group that
    crosses from one into the other and groups that start mid-tile; forward and gradients
    against the f32 loop, as in the bfloat16 test above."""
    tm, tk, tn = megablox.default_tiling()
    assert (tm, tk, tn) == megablox.TILES[""]  # the CPU host picks the TPU tiles too
    t, k, e, d, f = 300, 2, 3, tk, tn
    assert tm < t * k <= 2 * tm
    rng = np.random.default_rng(3)
    experts = np.stack([rng.choice(e, k, replace=False, p=[0.5, 0.3, 0.2]) for _ in range(t)])
    ends = np.cumsum(np.bincount(experts.reshape(-1), minlength=e))
    assert any(start < tm < end for start, end in zip([0, *ends[:-1]], ends))
    experts = jnp.asarray(experts, jnp.int32)
    gates = jax.random.uniform(jax.random.key(4), (t, k), minval=0.1)
    keys = jax.random.split(jax.random.key(5), 4)
    shapes = [(e, d, f), (e, d, f), (e, f, d)]
    weights = [jax.random.normal(kw, s) * s[1] ** -0.5 for kw, s in zip(keys[1:], shapes)]
    args = [a.astype(jnp.bfloat16) for a in [jax.random.normal(keys[0], (t, d)), *weights]]

    def production(x, experts, gates, *w):
        return grouped_swiglu(x, experts, gates, *w, implementation="megablox", interpret=True)

    def f32(tree):
        return jax.tree.map(lambda a: a.astype(jnp.float32), tree)

    got = f32(_value_and_grads(production, experts, gates, *args))
    loop = _value_and_grads(_dense_loop, experts, gates, *f32(args))
    assert_close_scaled(got, loop, rel=3e-2)  # (measured: <= 5.8e-3, the down weights')


@pytest.mark.parametrize("dtype, chunk", [(jnp.float32, 1), (jnp.float32, 3),
                                          (jnp.bfloat16, 2)])
def test_chunked_equals_the_loop(dtype, chunk):
    """Chunks of 1, 3 (float32) and 2 (bfloat16) of the 6 experts over one sort: groups that
    start mid-tile and span tiles, the empty expert and the rows with no expert; forward and
    gradients against the f32 loop (f32: f32 rounding; bf16: as in the bfloat16 test above)."""
    experts, gates = _routing()
    args = _inputs(dtype)

    def chunked(x, e, g, *w):
        return chunked_megablox_swiglu(x, e, g, *w, chunk=chunk, tiling=TILING, interpret=True)

    y, grads = _value_and_grads(chunked, experts, gates, *args)
    assert y.dtype == jnp.float32
    assert [g.dtype for g in grads] == [dtype, jnp.float32] + [dtype] * 3
    loop = _value_and_grads(_dense_loop, experts, gates, *(a.astype(jnp.float32) for a in args))
    got = jax.tree.map(lambda a: a.astype(jnp.float32), (y, grads))
    # Measured: f32 9.3e-7; bf16 1.5e-2 (both the down weights' gradient).
    assert_close_scaled(got, loop, rel=5e-6 if dtype == jnp.float32 else 3e-2)
    assert float(jnp.abs(grads[2][5]).max()) == 0  # the empty expert's gate gradient


def test_bad_input():
    experts, gates = _routing()
    x, *w = _inputs(jnp.float32)
    weights_M = gates.reshape(-1)
    with pytest.raises(ValueError, match="block = 1"):
        megablox_swiglu(x, weights_M, layout(experts, E, 8), *w, interpret=True)
    with pytest.raises(ValueError, match="bfloat16 or float32"):
        megablox_swiglu(x.astype(jnp.float16), weights_M, layout(experts, E, 1), *w,
                        interpret=True)
    with pytest.raises(ValueError, match="must divide the 6 experts"):
        chunked_megablox_swiglu(x, experts, gates, *w, chunk=4, interpret=True)
