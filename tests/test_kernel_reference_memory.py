"""The chunked XLA references never materialise the score matrix.

XLA's compiled temp-buffer size (memory_analysis().temp_size_in_bytes, compile only, nothing
runs) of mla_attention_reference grows ~2x per doubling of T = S, forward and backward, while
the dense oracle grows ~4x ([B, N, T, S] scores). The decode reference's temp memory does not
grow with the cache at all. bench/attention_memory.py prints the same numbers as a table.
"""

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import (
    latent_attention_reference,
    mla_attention_naive,
    mla_attention_reference,
)

B, N, H, R, V = 1, 2, 16, 8, 16
SEQ_LENS = (2048, 4096, 8192)


def _mla_args(s):
    shapes = [(B, s, N, H), (B, s, N, R), (B, s, N, H), (B, s, R), (B, s, N, V)]
    return [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in shapes]


def temp_bytes(fn, args):
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def _mla_fn(which, mode):
    if which == "reference":
        fn = lambda *a: mla_attention_reference(*a, sm_scale=0.1, block_kv=256)  # noqa: E731
    else:
        fn = lambda *a: mla_attention_naive(*a, sm_scale=0.1)  # noqa: E731
    if mode == "fwd":
        return fn
    return jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=(0, 1, 2, 3, 4))


@pytest.mark.parametrize("mode", ["fwd", "grad"])
def test_mla_reference_memory_is_linear_in_sequence(mode):
    ref = [temp_bytes(_mla_fn("reference", mode), _mla_args(s)) for s in SEQ_LENS]
    naive = [temp_bytes(_mla_fn("naive", mode), _mla_args(s)) for s in SEQ_LENS]
    for small, big in zip(ref, ref[1:]):
        assert 1.5 < big / small < 2.5, ref
    for small, big in zip(naive, naive[1:]):
        assert big / small > 3.5, naive
    # At 8K the dense scores alone are 8K * 8K * N * 4 B = 512 MiB.
    assert naive[-1] > 8 * ref[-1], (ref, naive)


def test_latent_reference_memory_does_not_grow_with_cache():
    t, n, c, r = 1, 16, 64, 16

    def args(s):
        shapes = [(4, t, n, c), (4, t, n, r), (4, s, c), (4, s, r)]
        return [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in shapes] + [
            jax.ShapeDtypeStruct((4,), jnp.int32)]

    def fn(q_lat, q_pe, kv, k_pe, lengths):
        return latent_attention_reference(q_lat, q_pe, kv, k_pe, lengths_B=lengths,
                                          sm_scale=0.1, block_kv=256)

    small, big = temp_bytes(fn, args(2048)), temp_bytes(fn, args(16384))
    assert big <= 1.1 * small + 4096, (small, big)
