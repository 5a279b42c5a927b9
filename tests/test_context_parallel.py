"""Context parallelism (context_parallel.py): the zigzag layout, its balance of attention work,
the MLA layer on the Pallas kernel and a whole-model train step, with each sequence split over
`context`, equal to one device."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_configs import small_config
from tolerance import assert_close_scaled

from configs import tiny
from mla_moe import MLA, DeepSeekModel, attention, context_parallel, key_blocks, sharding
from mla_moe.train import checkpoint as ckpt_lib
from mla_moe.train import config as config_lib
from mla_moe.train import train_step as step_lib
from mla_moe.train.config import ConfigError

# Two layers (a dense one, a MoE one) and an MTP module: every per-token path and both shifts.
CFG = small_config(vocab_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_nextn_predict_layers=1)
B, T = 4, 16
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
# The same float32 sums reduced across devices in another order (the attention's softmax over
# the gathered keys, the gathered latent's gradient reduce-scattered): 2^7 float32 roundings
# of a leaf's largest entry, the bound of test_sharding_train.py.
GRAD_REL = 2**7 * float(np.finfo(np.float32).eps)
# Mesh, the keys per block of the attention loop (T = 16: 4 blocks, 1, 2), and whether the
# layers run as a scan (the block loop differentiated inside another scan).
MESHES = {
    "context4": (dict(context=4), 4, False),  # data=2
    "context2_fsdp2": (dict(context=2, fsdp=2), 512, False),  # data=2
    "context2_expert2_tensor2": (dict(context=2, expert=2, tensor=2), 8, True),
}
# The chunked CE + MTP loss, as training runs it (train.loss_chunk_tokens), chunks of 8 tokens.
CHUNK_TOKENS = 8


# --- the layout ---------------------------------------------------------------------------------
@pytest.mark.parametrize("context", [1, 2, 4])
def test_zigzag_is_a_permutation_and_unzigzag_inverts_it(context):
    idx = context_parallel.zigzag_indices(16, context)
    assert sorted(idx.tolist()) == list(range(16))
    x = jnp.arange(3 * 16).reshape(3, 16)
    np.testing.assert_array_equal(context_parallel.zigzag(x, context), x[:, idx])
    np.testing.assert_array_equal(
        context_parallel.unzigzag(context_parallel.zigzag(x, context), context), x)
    if context == 2:  # chunks of 4: shard 0 holds chunks 0 and 3, shard 1 chunks 1 and 2
        assert idx.tolist() == [0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 10, 11]


def test_zigzag_rejects_a_length_not_divisible_by_twice_the_context():
    with pytest.raises(ValueError, match="not divisible by 2 x context=4"):
        context_parallel.zigzag_indices(12, 4)


@pytest.mark.parametrize("context", [2, 4, 8])
def test_every_shard_has_the_same_causal_attention_work(context):
    """Visible (query, key) pairs per shard: equal under zigzag, unequal when contiguous."""
    t = 64
    idx = context_parallel.zigzag_indices(t, context)
    visible = idx[:, None] >= np.arange(t)[None, :]  # rows: the layout's queries
    work = visible.reshape(context, t // context, t).sum(axis=(1, 2))
    assert len(set(work.tolist())) == 1 and work.sum() == t * (t + 1) // 2
    contiguous = np.tril(np.ones((t, t), bool)).reshape(context, t // context, t).sum(axis=(1, 2))
    assert contiguous[-1] > contiguous[0]


# --- attention a key block at a time against the masked attention ----------------------------
def test_key_blocks_match_naive_attention_forward_and_backward():
    """key_blocks.latent_attention_blocked (4 blocks, a permuted causal order, two segments)
    against attention.naive_attention over the whole up-projected keys and values."""
    b, t, n, h, r, v, c = 2, 16, 3, 8, 4, 6, 10
    ks = jax.random.split(jax.random.key(0), 6)
    q_nope, q_pe = jax.random.normal(ks[0], (b, t, n, h)), jax.random.normal(ks[1], (b, t, n, r))
    kv = jax.random.normal(ks[2], (b, t, c + r))
    wk, wv = 0.3 * jax.random.normal(ks[3], (c, n, h)), 0.3 * jax.random.normal(ks[4], (c, n, v))
    seg = jnp.array([[0] * 5 + [1] * 11, [0] * 16])
    order = jnp.asarray(context_parallel.zigzag_indices(t, 2))

    def reference(q_nope, q_pe, kv, wk, wv):
        mask = (order[:, None] >= order[None, :])[None] & (seg[:, :, None] == seg[:, None, :])
        k_nope = jnp.einsum("BSC,CNH->BSNH", kv[..., :c], wk)
        values = jnp.einsum("BSC,CNV->BSNV", kv[..., :c], wv)
        return attention.naive_attention(q_nope, q_pe, k_nope, kv[..., c:], values, mask, 0.3)

    def blocked(q_nope, q_pe, kv, wk, wv):
        return key_blocks.latent_attention_blocked(q_nope, q_pe, kv, (order, seg, order, seg),
                                                   wk, wv, 0.3, 4)

    ct = jax.random.normal(ks[5], (b, t, n, v))

    @functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
    def forward_and_vjp(fn, *args):
        out, vjp = jax.vjp(fn, *args)
        return out, vjp(ct)

    args = (q_nope, q_pe, kv, wk, wv)
    # float32 sums in another order (online softmax): measured 2.6e-7 of each leaf's largest.
    assert_close_scaled(forward_and_vjp(blocked, *args), forward_and_vjp(reference, *args),
                        rel=GRAD_REL)


# --- the Pallas kernel under context parallelism -------------------------------------------------
def test_mla_kernel_with_context_matches_one_device():
    """The MLA layer on the Pallas kernel (Pallas' interpreter) with each sequence split over
    context 2 (zigzag layout: the kernel takes the shard's queries' sequence indices against
    the gathered keys) equals the same layer on one device: output, the weights' gradients
    and the input's, with packed documents."""
    cfg = small_config(vocab_size=64, num_attention_heads=4, attention_impl="interpret")
    graphdef, params, rest = nnx.split(MLA(cfg, rngs=nnx.Rngs(1)), nnx.Param, ...)
    b, t = 2, 16
    ks = jax.random.split(jax.random.key(4), 2)
    x_BTD = jax.random.normal(ks[0], (b, t, cfg.hidden_size))
    ct_BTD = jax.random.normal(ks[1], (b, t, cfg.hidden_size))
    seg_BT = jnp.asarray([[0] * 16, [0] * 5 + [1] * 11], jnp.int32)
    pos_BT = jnp.asarray([list(range(16)), list(range(5)) + list(range(11))], jnp.int32)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def forward_and_vjp(params, x_BTD, pos_BT, seg_BT, ct_BTD):
        def layer(params, x_BTD):
            return nnx.merge(graphdef, params, rest)(x_BTD, pos_BT, seg_BT)[0]

        out_BTD, vjp = jax.vjp(layer, params, x_BTD)
        return out_BTD, vjp(ct_BTD)

    out_ref, (grads_ref, dx_ref) = forward_and_vjp(params, x_BTD, pos_BT, seg_BT, ct_BTD)
    mesh = sharding.make_mesh(dict(data=-1, context=2, tensor=2), config=cfg)
    zig = functools.partial(context_parallel.zigzag, context=2)
    with sharding.use_mesh(mesh):
        out, (grads, dx) = forward_and_vjp(params, zig(x_BTD), zig(pos_BT), zig(seg_BT),
                                           zig(ct_BTD))
    unzig = functools.partial(context_parallel.unzigzag, context=2)
    assert_close_scaled((unzig(out), grads, unzig(dx)), (out_ref, grads_ref, dx_ref),
                        rel=GRAD_REL)


# --- a train step on the mesh against one device --------------------------------------------------
def _batch():
    """Packed rows: documents of several lengths (positions restart per document, segment ids
    change), a few zero target weights."""
    k1, k2 = jax.random.split(jax.random.key(3))
    tokens = jax.random.randint(k1, (B, T + 1), 0, CFG.vocab_size)
    cuts = [[16], [5, 16], [9, 13, 16], [2, 16]]
    seg = np.concatenate([[np.repeat(np.arange(len(c)), np.diff([0, *c]))] for c in cuts])
    pos = np.concatenate([[np.concatenate([np.arange(n) for n in np.diff([0, *c])])]
                          for c in cuts])
    weights = (jax.random.uniform(k2, (B, T)) > 0.1).astype(jnp.float32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "positions": jnp.asarray(pos, jnp.int32), "segment_ids": jnp.asarray(seg, jnp.int32),
            "weights": weights}


@functools.cache
def _setup():
    model = DeepSeekModel(CFG, rngs=nnx.Rngs(0))
    graphdef, params, extra = nnx.split(model, nnx.Param, ...)
    return graphdef, jax.device_get(params), jax.device_get(extra), jax.device_get(_batch())


def _grads_fn(graphdef):
    step_cfg = step_lib.StepConfig(loss_chunk_tokens=CHUNK_TOKENS)

    def fn(params, extra, batch):
        loss, metrics, grads = step_lib._grads_and_aux(params, extra, batch, graphdef, CFG,
                                                       step_cfg)
        return loss, metrics["ce_sum"], metrics["mtp_loss"], grads

    return fn


@functools.cache
def _reference():
    graphdef, params, extra, batch = _setup()
    return jax.device_get(jax.jit(_grads_fn(graphdef),
                                  compiler_options=FAST_COMPILE)(params, extra, batch))


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_train_step_with_context_matches_one_device(mesh_name, monkeypatch):
    """Loss, CE and MTP sums and every gradient leaf, with each sequence split over `context`
    (zigzag layout, attention over the gathered latent a key block at a time), against one
    device."""
    graphdef, params, extra, batch = _setup()
    axes, key_block, scan = MESHES[mesh_name]
    if scan:  # the same weights, run as a scanned stack
        graphdef = nnx.split(nnx.eval_shape(lambda: DeepSeekModel(
            CFG.replace(scan_layers=True), rngs=nnx.Rngs(0))), nnx.Param, ...)[0]
    monkeypatch.setattr(context_parallel, "KEY_BLOCK", key_block)
    mesh = sharding.make_mesh(dict(data=-1, **axes), config=CFG)
    with sharding.use_mesh(mesh):
        p_sh = sharding.state_shardings(params, mesh)
        e_sh = sharding.state_shardings(extra, mesh)
        b_sh = sharding.batch_sharding(mesh)
        assert b_sh.spec[1] == "context"
        fn = jax.jit(_grads_fn(graphdef), in_shardings=(p_sh, e_sh, b_sh),
                     out_shardings=(None, None, None, p_sh), compiler_options=FAST_COMPILE)
        loss, ce, mtp, grads = jax.device_get(fn(*jax.device_put((params, extra, batch),
                                                                 (p_sh, e_sh, b_sh))))
    loss_ref, ce_ref, mtp_ref, grads_ref = _reference()
    assert np.isfinite(loss) and mtp_ref > 0
    assert_close_scaled((loss, ce, mtp), (loss_ref, ce_ref, mtp_ref), rel=1e-6)
    flat = ckpt_lib.flatten_state
    assert set(flat(grads)) == set(flat(grads_ref))
    assert_close_scaled(flat(grads), flat(grads_ref), rel=GRAD_REL, err_msg="grads")


# --- validation ---------------------------------------------------------------------------------
def _run_config(**mesh):
    return config_lib.run_config(tiny.model_config(), train=dict(seq_len=64), mesh=mesh)


def test_context_is_validated_before_compute():
    config_lib.validate(_run_config(context=4))
    with pytest.raises(ConfigError, match="train.seq_len=64 is not divisible by 2 x "
                                          "mesh.context=64"):
        config_lib.validate(_run_config(context=64))
    with pytest.raises(ConfigError, match="mesh.context must be a positive integer"):
        config_lib.validate(_run_config(context=0))
    c = _run_config(context=2)
    c.model.attention_impl = "pallas"  # the kernel with the queries' positions
    config_lib.validate(c)
    c = _run_config(context=2)
    c.model.index_n_heads = 2
    with pytest.raises(ConfigError, match="model.index_n_heads=2"):
        config_lib.validate(c)
