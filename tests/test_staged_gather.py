"""Two-stage FSDP gathers (sharding/staged.py): the blocks chosen from torus coordinates, the
same values and gradients as one all-gather (8 CPU devices), and, on the real compiler for
v5p:8x8x8, all-gathers and reduce-scatters where the one-stage gather over the 512 chips is an
all-reduce."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import mesh_utils

from mla_moe import sharding
from mla_moe.sharding import staged
from mla_moe.train import hlo_collectives
from pallas_kernels import targets

P = jax.sharding.PartitionSpec


def _torus(x, y, z):
    """Coordinates of an x*y*z torus in row-major order (z fastest), [x*y*z, 3]."""
    return np.stack(np.meshgrid(np.arange(x), np.arange(y), np.arange(z), indexing="ij"),
                    -1).reshape(-1, 3)


def test_block_size_from_coordinates():
    assert staged.block_size(_torus(8, 8, 8)) == 64  # one 8x8 plane per block
    assert staged.block_size(_torus(4, 4, 4)) == 16
    assert staged.block_size(_torus(2, 2, 2)) == 4
    assert staged.block_size(_torus(2, 2, 1)) == 0  # two dimensions: one stage stays a gather
    assert staged.block_size(_torus(1, 1, 8)) == 0
    # An order whose blocks each span three dimensions has no two-dimensional split.
    assert staged.block_size(_torus(2, 2, 2)[[0, 7, 1, 6, 2, 5, 3, 4]]) == 0
    within, across = staged.stage_groups(8, 4)
    assert within == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert across == ((0, 4), (1, 5), (2, 6), (3, 7))


@pytest.mark.parametrize("block", [2, 4])
def test_two_stages_equal_one_gather_and_its_transpose(block):
    """Forward: bitwise the one-stage gather. Gradient (the reduce-scatter): the same sums in
    another order (f32 rounding)."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("fsdp",))
    grad1 = _staged_equals_one_gather(mesh, ("fsdp",), ("fsdp", staged.stage_groups(8, block)))
    ct = jax.random.normal(jax.random.key(1), (8, 3, 16, 5))
    np.testing.assert_allclose(grad1, ct.sum(0), rtol=1e-6, atol=1e-6 * float(np.abs(grad1).max()))


def _staged_equals_one_gather(mesh, axes, how):
    """Gathers a [3, 16, 5] array split on its middle axis over `axes`, staged as `how` says
    and in one collective, and takes each one's transpose of a cotangent per shard: the
    forwards equal bitwise, the gradients to f32 rounding. Returns the one-stage gradient."""
    spec = P(None, axes, None)
    w = jax.random.normal(jax.random.key(0), (3, 16, 5))
    ct = jax.random.normal(jax.random.key(1), (8, 3, 16, 5))  # a cotangent per shard

    def run(how):
        def body(w_s, ct_s):
            full, vjp = jax.vjp(lambda a: staged.all_gather(a, axes, 1, staged=how), w_s)
            return full[None], vjp(ct_s[0])[0]

        fn = jax.shard_map(body, mesh=mesh, in_specs=(spec, P(axes)),
                           out_specs=(P(axes), spec), check_vma=False)
        return jax.jit(fn)(w, ct)

    full2, grad2 = run(how)
    full1, grad1 = run(False)
    np.testing.assert_array_equal(full2, full1)
    np.testing.assert_array_equal(full2[0], w)
    np.testing.assert_allclose(grad2, grad1, rtol=1e-6, atol=1e-6 * float(np.abs(grad1).max()))
    return grad1


def _collectives(hlo: str) -> dict[str, int]:
    return {k: len(re.findall(rf"\b{k}(-start)?\(", hlo))
            for k in ("all-gather", "all-reduce", "reduce-scatter")}


def test_v5p_8x8x8_keeps_all_gathers():
    """A [32, 7168, 4096] bf16 weight (one V3 expert chunk's gate) over fsdp = 512: gathered
    and its gradient reduce-scattered (compile-only, the real XLA:TPU)."""
    devices = targets.devices("tpu:v5p:8x8x8")
    mesh = jax.sharding.Mesh(mesh_utils.create_device_mesh((1, 512), devices),
                             ("expert", "fsdp"))
    spec = P(None, "fsdp", None)
    x = jax.ShapeDtypeStruct((32, 7168, 4096), jnp.bfloat16,
                             sharding=jax.sharding.NamedSharding(mesh, spec))

    def compiled(how):
        def body(w):
            return jax.grad(lambda a: jnp.sum(
                staged.all_gather(a, ("fsdp",), 1, staged=how).astype(jnp.float32) ** 2))(w)

        fn = jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)
        with sharding.use_mesh(mesh):
            return jax.jit(fn).lower(x).compile().as_text()

    with sharding.use_mesh(mesh):
        assert staged.groups(("fsdp",))[1] == staged.stage_groups(512, 64)
        assert staged.groups(("expert",)) is None  # an axis of size 1
    assert _collectives(compiled(True)) == {"all-gather": 2, "all-reduce": 0,
                                            "reduce-scatter": 2}
    # One stage: the same gather and reduce-scatter, lowered as all-reduces.
    one = _collectives(compiled(False))
    assert one["all-gather"] == one["reduce-scatter"] == 0 and one["all-reduce"] >= 2, one


@pytest.mark.parametrize("steps", [
    (("context", None), ("fsdp", None)),
    (("context", staged.stage_groups(4, 2)), ("fsdp", None)),
])
def test_gathers_over_two_axes_one_at_a_time_equal_one_gather(steps):
    """Over (fsdp, context), minor axis first: forward bitwise the joint gather; gradient the
    same sums in another order."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("fsdp", "context"))
    _staged_equals_one_gather(mesh, ("fsdp", "context"), steps)


def test_v5p_8x8x8_with_context_keeps_all_gathers():
    """fsdp=128 x context=4 (sharding.make_mesh, one torus dimension split): one V3 expert
    chunk's gate gathered over both axes, context first, then fsdp in two stages; one joint
    gather would be lowered as an all-reduce."""
    mesh = sharding.make_mesh(dict(fsdp=-1, context=4), devices=targets.devices("tpu:v5p:8x8x8"))
    axes = ("fsdp", "context")
    spec = P(None, axes, None)
    x = jax.ShapeDtypeStruct((32, 7168, 4096), jnp.bfloat16,
                             sharding=jax.sharding.NamedSharding(mesh, spec))

    def compiled(how):
        def body(w):
            return jax.grad(lambda a: jnp.sum(
                staged.all_gather(a, axes, 1, staged=how).astype(jnp.float32) ** 2))(w)

        fn = jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)
        with sharding.use_mesh(mesh):
            return jax.jit(fn).lower(x).compile().as_text()

    with sharding.use_mesh(mesh):
        steps = staged.plan(axes)
    assert [a for a, _ in steps] == ["context", "fsdp"]
    assert steps[0][1] is None and steps[1][1] is not None  # context: 4 neighbours
    # Received over links, per device: the gather and its transpose ~(N-1)/N of the array
    # each; XLA keeps the last, 4-way, reduce-scatter (1/128 of the array) as an all-reduce.
    array = 32 * 7168 * 4096 * 2
    text = compiled(True)
    staged_ = hlo_collectives.collectives(text)
    assert _collectives(text)["all-gather"] == 3
    assert staged_["all-gather"]["bytes"] <= array
    assert staged_["reduce-scatter"]["bytes"] + staged_["all-reduce"]["bytes"] <= 1.01 * array
    one = hlo_collectives.collectives(compiled(False))
    assert one["all-reduce"]["bytes"] >= 3 * array, one  # gather and transpose as all-reduces
