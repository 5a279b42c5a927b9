"""The Pallas attention kernels inside the model's mesh (`jax.shard_map`) equal the XLA path.

Each mesh of the sharding tests, on 8 simulated CPU devices; the TPU-layout kernels run in
TPU interpret mode, the GPU-layout ones in Pallas' generic interpreter. Batch and heads are
split by the rules (batch over the data axes, heads over tensor); the other axes see the
kernels' inputs replicated. Forward and gradients, training (flash) and decode (latent).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tolerance import assert_close_scaled

from mla_moe import ModelConfig, sharding
from mla_moe.mla import MLA

CFG = ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
    num_hidden_layers=1, num_attention_heads=4, q_lora_rank=24, kv_lora_rank=16,
    qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, n_routed_experts=8,
    num_experts_per_tok=2, initializer_range=0.2,
)
MESHES = {
    "expert8": dict(expert=8),
    "data2_expert4": dict(data=2, expert=4),
    "fsdp2_expert2_tensor2": dict(fsdp=2, expert=2, tensor=2),
    "data8": dict(data=8),
}
B, T, S = 8, 12, 16
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _close(actual, expected):
    """Per array, to 1e-5 of the largest |expected| (f32 throughout)."""
    assert_close_scaled(actual, expected, rel=1e-5)


@functools.cache
def _inputs():
    x_BTD = jax.random.normal(jax.random.key(1), (B, T, CFG.hidden_size), jnp.float32)
    segs_BT = jnp.asarray(np.sort(np.random.default_rng(0).integers(0, 3, (B, T)), axis=1))
    positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
    return x_BTD, segs_BT, positions_BT


def _train_loss(impl):
    """Loss and its gradients (weights and input) of one MLA layer, flash path."""
    x_BTD, segs_BT, positions_BT = _inputs()
    layer = MLA(CFG.replace(attention_impl=impl), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer)

    def loss(params, x_BTD):
        out_BTD, _ = nnx.merge(graphdef, params)(x_BTD, positions_BT, segs_BT)
        return jnp.sum(jnp.sin(out_BTD))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)),
                   compiler_options=FAST_COMPILE), params, x_BTD


def _decode(impl):
    """One absorbed step of 2 tokens over a ragged latent cache: output and new cache."""
    layer = MLA(CFG.replace(attention_impl=impl), rngs=nnx.Rngs(0))
    k = CFG.kv_lora_rank + CFG.qk_rope_head_dim
    cache_BSL = jax.random.normal(jax.random.key(2), (B, S, k), jnp.float32)
    lengths_B = jnp.arange(B, dtype=jnp.int32) % 5 + 3
    x_BTD = jax.random.normal(jax.random.key(3), (B, 2, CFG.hidden_size), jnp.float32)
    positions_BT = lengths_B[:, None] + jnp.arange(2)[None, :]

    @jax.jit
    def step(x_BTD, cache_BSL):
        return layer(x_BTD, positions_BT, cache_BSW=cache_BSL, lengths_B=lengths_B,
                     form="absorbed")

    return step, x_BTD, cache_BSL


@functools.cache
def _train_reference():
    fn, params, x_BTD = _train_loss("xla")
    return jax.device_get(fn(params, x_BTD))


@functools.cache
def _decode_reference():
    step, x_BTD, cache_BSL = _decode("xla")
    return jax.device_get(step(x_BTD, cache_BSL))


def _on_mesh(mesh_name, fn):
    mesh = sharding.make_mesh(MESHES[mesh_name], config=CFG)
    with sharding.use_mesh(mesh):
        return jax.device_get(fn(mesh))


def _assert_kernel_in_shard_map(lowered, mesh):
    """The kernel call sits in a manual computation, split over tensor when the mesh has it."""
    calls = [line for line in lowered.as_text().splitlines() if "sdy.manual_computation(" in line]
    assert calls, "the kernel is not called inside shard_map"
    if dict(mesh.shape)["tensor"] > 1:
        assert all('{"tensor"}' in line for line in calls), calls


@pytest.mark.parametrize("mesh_name,impl", [(m, "tpu_interpret") for m in MESHES] + [
    ("data2_expert4", "interpret"), ("fsdp2_expert2_tensor2", "interpret")])
def test_flash_kernel_on_a_mesh_equals_xla(mesh_name, impl):
    def run(mesh):
        fn, params, x_BTD = _train_loss(impl)
        x_BTD = jax.device_put(x_BTD, sharding.batch_sharding(mesh))
        _assert_kernel_in_shard_map(fn.lower(params, x_BTD), mesh)
        return fn(params, x_BTD)

    (loss, grads) = _on_mesh(mesh_name, run)
    loss_ref, grads_ref = _train_reference()
    _close(loss, loss_ref)
    _close(grads, grads_ref)


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_latent_kernel_on_a_mesh_equals_xla(mesh_name):
    def run(mesh):
        step, x_BTD, cache_BSL = _decode("tpu_interpret")
        x_BTD, cache_BSL = jax.device_put((x_BTD, cache_BSL), sharding.batch_sharding(mesh))
        _assert_kernel_in_shard_map(step.lower(x_BTD, cache_BSL), mesh)
        return step(x_BTD, cache_BSL)

    _close(_on_mesh(mesh_name, run), _decode_reference())
