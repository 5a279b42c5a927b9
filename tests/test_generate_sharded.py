"""Generation with the model sharded on a mesh (experts over `expert`, heads over `tensor`,
the cache over the batch axes) gives the same tokens as on one device, plain and
speculative."""

import jax
import numpy as np
import pytest
from flax import nnx
from test_decode import PROMPTS, tiny_model

import mla_moe
from mla_moe import sharding
from mla_moe.speculative import speculative_generate

PROMPTS4 = PROMPTS + [[9, 2, 77, 1]]  # a batch the data axis divides
MESHES = {
    "expert4_tensor2": dict(expert=4, tensor=2),
    "data2_expert4": dict(data=2, expert=4),
}
MAX_NEW = 10


def _mesh(name, model):
    return sharding.make_mesh(MESHES[name], config=model.config)


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_sharded_generate_equals_one_device(mesh_name):
    model = tiny_model()
    want = mla_moe.generate(model, PROMPTS4, max_new_tokens=MAX_NEW)
    got = mla_moe.generate(model, PROMPTS4, max_new_tokens=MAX_NEW, mesh=_mesh(mesh_name, model))
    assert got == want


def test_sharded_speculative_equals_one_device_greedy():
    model = tiny_model()
    want = mla_moe.generate(model, PROMPTS, max_new_tokens=MAX_NEW)
    got, _ = speculative_generate(model, PROMPTS, max_new_tokens=MAX_NEW,
                                  mesh=_mesh("expert4_tensor2", model))
    assert got == want


def test_weights_and_cache_are_really_split():
    model = tiny_model()
    mesh = _mesh("data2_expert4", model)
    with sharding.on_mesh(model, mesh) as placed:
        moe = placed.groups[0].ffn
        spec = moe.gate_EDF[...].sharding.spec
        assert spec[1] == "expert"  # [layers, E, D, F]: experts over `expert`
        shard = moe.gate_EDF[...].addressable_shards[0].data
        assert shard.shape[1] == model.config.n_routed_experts // 4
        cache = sharding.place_cache(mla_moe.init_cache(model.config, 4, 64), mesh)
        assert cache.latents[0].sharding.spec[0] == "data"
        assert cache.latents[0].addressable_shards[0].data.shape[0] == 2
        odd = sharding.place_cache(mla_moe.init_cache(model.config, 3, 64), mesh)  # replicated
        assert odd.latents[0].addressable_shards[0].data.shape[0] == 3
    tp = _mesh("expert4_tensor2", model)
    with sharding.on_mesh(model, tp) as placed:
        w = placed.groups[0].attn.wq_b_QNA[...]  # [layers, Q, N, A]: heads over `tensor`
        assert w.sharding.spec[2] == "tensor"
        assert w.addressable_shards[0].data.shape[2] == model.config.num_attention_heads // 2
    # The caller's model is untouched (its weights stay where they were).
    state = nnx.state(model)
    assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(state))
    np.testing.assert_array_equal(np.asarray(jax.tree.leaves(nnx.state(placed))[0]),
                                  np.asarray(jax.tree.leaves(state)[0]))
