"""A whole-model train step (loss, every gradient, the updated parameters) on each mesh equals
one device."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from tolerance import assert_close_scaled

from mla_moe import DeepSeekModel, ModelConfig, losses, sharding
from mla_moe.train import checkpoint as ckpt_lib

CFG = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    moe_intermediate_size=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    q_lora_rank=None,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    topk_method="noaux_tc",
    scoring_func="sigmoid",
    n_group=1,
    topk_group=1,
    norm_topk_prob=True,
    routed_scaling_factor=2.5,
    aux_loss_alpha=0.01,
    seq_balance_alpha=0.01,
    moe_dispatch="auto",
)
MESHES = {
    "expert8": dict(expert=8),
    "data2_expert4": dict(data=2, expert=4),
    "fsdp2_expert2_tensor2": dict(fsdp=2, expert=2, tensor=2),
    "data8": dict(data=8),
    # Pure FSDP: every expert's weights gathered to the tokens' shard, no token exchange.
    "fsdp8": dict(fsdp=8),
}
B, T = 8, 8
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
# One clipped SGD step of global norm 0.5 (the gradient's is 1.1): the clip scales every leaf by
# the global norm, a reduction over every shard; the embedding and head move by about half their
# largest entry.
TX = optax.chain(optax.clip_by_global_norm(0.5), optax.sgd(1.0))
# Gradients and updated parameters: the same float32 sums reduced across devices in another
# order. Bound: 2^7 float32 roundings (eps 1.2e-7) of a leaf's largest entry; measured up to
# 5.5e-7 (gradients) and 1.6e-7 (parameters), on every mesh.
GRAD_REL = PARAM_REL = 2**7 * float(np.finfo(np.float32).eps)


@functools.cache
def _setup():
    make = lambda: DeepSeekModel(CFG, rngs=nnx.Rngs(0))  # noqa: E731
    graphdef = _graphdef(CFG)
    params, extra = jax.device_get(jax.jit(lambda: nnx.split(make(), nnx.Param, ...)[1:])())
    tokens = jax.random.randint(jax.random.key(1), (B, T + 1), 0, CFG.vocab_size)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    return graphdef, params, extra, batch


def _graphdef(cfg):
    return nnx.split(nnx.eval_shape(lambda: DeepSeekModel(cfg, rngs=nnx.Rngs(0))), nnx.Param, ...)[
        0
    ]


def _step(graphdef):
    """Pure step of CE (token mean) + the MoE aux losses and one optimizer update (`TX`):
    (loss, global gradient norm, gradients, updated parameters, layer 0's expert counts)."""

    def loss_fn(params, extra, batch):
        out = nnx.merge(graphdef, params, extra)(batch["inputs"])
        ce_sum, weight = losses.cross_entropy(out.logits, batch["targets"])
        return ce_sum / weight + out.aux_loss, out.router

    def step(params, extra, batch):
        (loss, router), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, extra, batch)
        norm = jnp.sqrt(sum(jnp.sum(g.astype(jnp.float32) ** 2) for g in jax.tree.leaves(grads)))
        updates, _ = TX.update(grads, TX.init(params), params)
        return loss, norm, grads, optax.apply_updates(params, updates), router[0].tokens_per_expert

    return step


@functools.lru_cache(maxsize=1)
def _reference():
    graphdef, params, extra, batch = _setup()
    return jax.device_get(
        jax.jit(_step(graphdef), compiler_options=FAST_COMPILE)(params, extra, batch)
    )


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_train_step_matches_single_device(mesh_name, remat_policy="none"):
    """The loss, every parameter's gradient and every updated parameter on the mesh against one
    device, leaf by leaf: a swapped, mis-scattered or sign-flipped leaf fails."""
    graphdef, params, extra, batch = _setup()
    if remat_policy != "none":  # the same weights, run as a scanned, rematerialised stack
        graphdef = _graphdef(CFG.replace(scan_layers=True, remat_policy=remat_policy))
    mesh = sharding.make_mesh(MESHES[mesh_name], config=CFG)
    with sharding.use_mesh(mesh):
        p_sh = sharding.state_shardings(params, mesh)
        e_sh = sharding.state_shardings(extra, mesh)
        b_sh = sharding.batch_sharding(mesh)
        step = jax.jit(
            _step(graphdef),
            in_shardings=(p_sh, e_sh, {"inputs": b_sh, "targets": b_sh}),
            out_shardings=(None, None, p_sh, p_sh, None),
            compiler_options=FAST_COMPILE,
        )
        params, extra, batch = jax.device_put((params, extra, batch), (p_sh, e_sh, b_sh))
        loss, norm, grads, new_params, counts = jax.device_get(step(params, extra, batch))
    loss_ref, norm_ref, grads_ref, new_params_ref, counts_ref = _reference()
    assert np.isfinite(loss) and norm > 0
    assert_close_scaled((loss, norm), (loss_ref, norm_ref), rel=1e-6)
    flat = ckpt_lib.flatten_state
    assert_close_scaled(flat(grads), flat(grads_ref), rel=GRAD_REL, err_msg="grads")
    assert_close_scaled(
        flat(new_params), flat(new_params_ref), rel=PARAM_REL, err_msg="updated params"
    )
    np.testing.assert_array_equal(counts, counts_ref)  # global counts for the bias update


@pytest.mark.parametrize(
    "remat_policy", ["offload_layer_input", "offload_layer_input_attention_out"]
)
def test_offloaded_remat_matches_single_device(remat_policy):
    """Layer inputs (and attention outputs) saved in host memory between the forward and the
    backward: the same loss, gradients and updated parameters as the plain single-device
    step."""
    test_train_step_matches_single_device("fsdp2_expert2_tensor2", remat_policy)
