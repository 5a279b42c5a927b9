"""Blocked DeepSeek Sparse Attention (dsa_blocked.py) against the dense forms it replaces at
long context: the top-k of indexer.py, the masked attention of attention.py and the KL of
dsa_loss.py, forward and gradients; then one attention layer (indexer included) and a whole
V3.2 model on each path.

Every case has packed segments and lengths that are not multiples of the blocks. Tolerances
are relative to the largest value compared (tolerance.py); the errors measured on CPU in
float32 are noted at each bound."""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tolerance import assert_close_scaled

from mla_moe import MLA, DeepSeekModel, ModelConfig, dsa_blocked, dsa_loss, sharding
from mla_moe import attention as attn
from mla_moe import indexer as dsa

# B, T, N heads, H, R, C; indexer: HI heads (many, so that ties in the top-k are unlikely), DI.
B, T, N, H, R, C, HI, DI = 2, 37, 3, 8, 4, 12, 16, 8
K, BLOCK_Q, BLOCK_K = 6, 8, 5  # T = 37 is a multiple of neither block
SCALE = 0.3
# f32 rounding of sums over a few dozen terms, in another order than the dense forms'
# (measured: <= 2e-7 forward, <= 5.2e-7 gradients, 6.4e-7 on the model's logits).
REL = 1e-5


def _inputs(seed=0):
    keys = jax.random.split(jax.random.key(seed), 10)
    normal = jax.random.normal
    segments_BT = jnp.asarray(np.repeat([[0] * 15 + [1] * 13 + [2] * 9], B, axis=0))
    segments_BT = segments_BT.at[1].set(jnp.asarray([0] * 30 + [1] * 7))
    return dict(
        q_nope=normal(keys[0], (B, T, N, H)), q_pe=normal(keys[1], (B, T, N, R)),
        kv=normal(keys[2], (B, T, C + R)), w_uk=normal(keys[3], (C, N, H)) * 0.3,
        w_uv=normal(keys[4], (C, N, 5)), iq=normal(keys[5], (B, T, HI, DI)),
        iw=normal(keys[6], (B, T, HI)), ik=normal(keys[7], (B, T, DI)), seg=segments_BT)


def _visible(seg):
    return attn.causal_segment_mask(seg, B, T)


def _sets(idx_BTK):
    """Each row's selected keys as a frozenset (-1 names none)."""
    return [[frozenset(int(s) for s in row if s >= 0) for row in seq]
            for seq in np.asarray(idx_BTK)]


@functools.cache
def _top_k(k):
    """(blocked, dense) top-k of the same random inputs, compiled once per k."""
    x = _inputs()
    blocked = jax.jit(dsa_blocked.top_k, static_argnums=(4, 5, 6))(
        x["iq"], x["iw"], x["ik"], x["seg"], k, BLOCK_Q, BLOCK_K)
    scores_BTS = dsa.index_scores(x["iq"], x["iw"], x["ik"])
    return blocked, dsa.top_k(scores_BTS, _visible(x["seg"]), k)


@pytest.mark.parametrize("k", [K, 2 * T])
def test_top_k_selects_the_dense_sets(k):
    blocked, dense = _top_k(k)
    assert blocked.shape == dense.shape == (B, T, min(k, T)) and blocked.dtype == jnp.int32
    assert _sets(blocked) == _sets(dense)
    # Rows that see fewer than k keys pad with -1, exactly where the dense top-k does.
    np.testing.assert_array_equal(np.sort(np.asarray(blocked) < 0, -1),
                                  np.sort(np.asarray(dense) < 0, -1))


def _selection(x):
    del x  # the inputs of _top_k, the same seed
    return _top_k(K)[0]


# --- the sparse attention ----------------------------------------------------------------------
def _dense_attention(q_nope, q_pe, kv, w_uk, w_uv, idx, seg):
    mask_BTS = _visible(seg) & dsa.selection_mask(idx, T)
    q_latent = jnp.einsum("BTNH,CNH->BTNC", q_nope, w_uk)
    o_latent = attn.absorbed_attention(q_latent, q_pe, [(kv, mask_BTS)], SCALE)
    return jnp.einsum("BTNC,CNV->BTNV", o_latent, w_uv)


def _blocked_attention(q_nope, q_pe, kv, w_uk, w_uv, idx, seg):
    del seg  # the selection is within the causal and segment masks
    return dsa_blocked.sparse_attention(q_nope, q_pe, kv, w_uk, w_uv, idx, SCALE, BLOCK_Q)


@functools.cache
def _attention_vjp(fn):
    x = _inputs()
    idx = _selection(x)
    args = tuple(x[k] for k in ("q_nope", "q_pe", "kv", "w_uk", "w_uv"))

    @jax.jit
    def run(args, g):
        out, vjp = jax.vjp(lambda *a: fn(*a, idx, x["seg"]), *args)
        return out, vjp(g)

    g = jax.random.normal(jax.random.key(1), (B, T, N, 5))
    return run(args, g)


def test_sparse_attention_matches_the_dense_masked_attention():
    (out, grads), (want, want_grads) = (_attention_vjp(_blocked_attention),
                                        _attention_vjp(_dense_attention))
    assert_close_scaled(out, want, rel=REL)
    for name, got_g, want_g in zip(("q_nope", "q_pe", "kv", "w_uk", "w_uv"), grads, want_grads,
                                   strict=True):
        assert_close_scaled(got_g, want_g, rel=REL, err_msg=name)


# --- the indexer's KL, both stages ---------------------------------------------------------------
def _dense_kl(x, idx, stage):
    mask_BTS = _visible(x["seg"])
    if stage == "sparse":
        mask_BTS = mask_BTS & dsa.selection_mask(idx, T)
    q_latent = jnp.einsum("BTNH,CNH->BTNC", x["q_nope"], x["w_uk"])
    target = dsa_loss.attention_target(q_latent, x["q_pe"], x["kv"], mask_BTS, SCALE)
    return dsa_loss.kl_to_scores(target, dsa.index_scores(x["iq"], x["iw"], x["ik"]), mask_BTS)


def _blocked_kl(x, idx, stage):
    target = (x["q_nope"], x["q_pe"], x["kv"], x["w_uk"])
    indexer = (x["iq"], x["iw"], x["ik"])
    if stage == "sparse":
        return dsa_blocked.sparse_kl(*target, idx, *indexer, SCALE, BLOCK_Q)
    return dsa_blocked.dense_kl(*target, x["seg"], *indexer, SCALE, BLOCK_Q, BLOCK_K)


@functools.cache
def _kl_vjp(fn, stage):
    """(KL per token, gradients w.r.t. every input float array) for a random cotangent."""
    x = _inputs()
    idx = _selection(x)
    floats = {k: v for k, v in x.items() if k != "seg"}

    @jax.jit
    def run(floats, g):
        out, vjp = jax.vjp(lambda f: fn(f | {"seg": x["seg"]}, idx, stage), floats)
        return out, vjp(g)[0]

    return run(floats, jax.random.uniform(jax.random.key(2), (B, T)))


@pytest.mark.parametrize("stage", ["sparse", "dense"])
def test_kl_matches_dsa_loss(stage):
    (kl, grads), (want, want_grads) = _kl_vjp(_blocked_kl, stage), _kl_vjp(_dense_kl, stage)
    assert float(jnp.mean(want)) > 0.1  # a real divergence (0 only where one key is seen)
    assert_close_scaled(kl, want, rel=REL)
    for name in ("iq", "iw", "ik"):
        assert_close_scaled(grads[name], want_grads[name], rel=REL, err_msg=name)
        assert float(jnp.max(jnp.abs(want_grads[name]))) > 0
    for name in ("q_nope", "q_pe", "kv", "w_uk"):  # the target is detached
        assert not np.any(np.asarray(grads[name])), name


# --- a whole V3.2 model ------------------------------------------------------------------------
TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
            num_hidden_layers=2, num_attention_heads=4, q_lora_rank=24, kv_lora_rank=16,
            qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4,
            n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
            index_n_heads=16, index_head_dim=8, index_topk=6, index_block_q=8, index_block_k=7,
            initializer_range=0.2, max_position_embeddings=128)


@functools.cache
def _model_outputs(index_attention, dense_max_len):
    cfg = ModelConfig(**TINY, index_attention=index_attention,
                      index_dense_max_len=dense_max_len)
    model = DeepSeekModel(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(3), (2, 30), 0, 96)
    segments = jnp.asarray([[0] * 30, [0] * 12 + [1] * 18])

    @functools.partial(jax.jit, static_argnums=0)
    def run(graphdef, state):
        out = nnx.merge(graphdef, state)(tokens, segment_ids_BT=segments, indexer_loss=True)
        return out.logits, out.indexer_loss

    return run(*nnx.split(model))


def _avals(jaxpr):
    """Every intermediate's abstract value in a jaxpr, nested jaxprs (scan, cond, remat) too."""
    for eqn in jaxpr.eqns:
        yield from (v.aval for v in eqn.outvars)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if hasattr(sub, "eqns"):
                    yield from _avals(sub)
                elif hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    yield from _avals(sub.jaxpr)


def test_blocked_model_has_no_sequence_squared_array():
    """The sparse stage's forward and backward (logits, indexer loss) on the blocked path
    build nothing with two axes of the sequence's length, inside the block loops included."""
    shapes = _model_grads()[1]
    assert not {shape for shape in shapes if shape.count(SEQ) >= 2}
    # The walk reaches the loops: a block's attention scores [B, block_q, N, K] are there.
    assert (2, TINY["index_block_q"], TINY["num_attention_heads"], TINY["index_topk"]) in shapes


# --- one attention layer ------------------------------------------------------------------------
@functools.cache
def _layer_vjp(index_attention, dense_max_len):
    """One V3.2 MLA layer (its indexer included) over SEQ packed tokens: (its output, its
    indexer loss) and their vjp for random cotangents, w.r.t. x and every parameter."""
    cfg = ModelConfig(**TINY, index_attention=index_attention, index_dense_max_len=dense_max_len)
    graphdef, params = nnx.split(MLA(cfg, rngs=nnx.Rngs(0)))
    kx, kg = jax.random.split(jax.random.key(5))
    x_BTD = jax.random.normal(kx, (2, SEQ, TINY["hidden_size"]))
    g_BTD = jax.random.normal(kg, x_BTD.shape)
    segments_BT = jnp.asarray([[0] * SEQ, [0] * 11 + [1] * (SEQ - 11)])

    def layer(params, x_BTD):
        mla = nnx.merge(graphdef, params)
        out_BTD, _, loss = mla.attend(x_BTD, segment_ids_BT=segments_BT, indexer_loss=True)
        return out_BTD, loss

    @functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
    def run(params, x_BTD):
        outs, vjp = jax.vjp(layer, params, x_BTD)
        return outs, vjp((g_BTD, jnp.float32(0.7)))

    return run(params, x_BTD)


def test_layer_on_the_blocked_path_matches_the_dense_path():
    """The sparse stage: SEQ = 30 tokens > index_topk = 6, so each later query attends to 6
    of its visible keys and the indexer's KL covers them; forward, and the gradients w.r.t.
    the layer's input and each of its weights (the indexer's from its KL alone). (The dense
    stage's blocked KL is checked above with its gradients, and in the whole model below.)"""
    (out, kl), (grads, dx) = _layer_vjp("sparse", 16)  # blocked
    (want_out, want_kl), (want_grads, want_dx) = _layer_vjp("sparse", 1024)  # dense
    assert float(want_kl) > 0
    # (measured: <= 3.7e-7)
    assert_close_scaled(out, want_out, rel=REL)
    assert_close_scaled(kl, want_kl, rel=REL)
    assert_close_scaled(dx, want_dx, rel=REL, err_msg="x")
    assert_close_scaled(grads, want_grads, rel=REL, err_msg="params")
    for path, g in nnx.to_flat_state(want_grads):
        assert float(jnp.max(jnp.abs(g[...]))) > 0, path  # every weight has a gradient


@pytest.mark.parametrize("field", ["index_block_q", "index_block_k", "index_dense_max_len"])
def test_bad_block_fields_are_named(field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**TINY | {field: -1})


@pytest.mark.parametrize("index_attention", ["sparse", "dense"])
def test_model_on_the_blocked_path_matches_the_dense_path(index_attention):
    logits, kl = _model_outputs(index_attention, 16)  # 30 tokens: blocked
    want_logits, want_kl = _model_outputs(index_attention, 1024)  # dense
    # (measured: 6.4e-7 logits, 1e-7 KL sparse; the dense stage's logits are identical)
    assert_close_scaled(logits, want_logits, rel=REL)
    assert_close_scaled(kl, want_kl, rel=REL)
    assert float(want_kl) > 0


SEQ = 30  # tokens of the whole-model tests: above index_dense_max_len=16, so blocked


def _tokens():
    return jax.random.randint(jax.random.key(4), (2, SEQ), 0, TINY["vocab_size"])


@functools.cache
def _model_grads(mesh_shape=None):
    """(logits loss and indexer loss, the gradient w.r.t. every weight) of a one-layer V3.2
    model on the blocked sparse path: on one device, with the shapes of every intermediate of
    the traced step; or, with mesh_shape, on the 8 simulated devices, with the lowered text."""
    cfg = ModelConfig(**TINY | dict(num_hidden_layers=1), index_dense_max_len=16)
    mesh = sharding.make_mesh(dict(mesh_shape), config=cfg) if mesh_shape else None
    with sharding.use_mesh(mesh) if mesh else contextlib.nullcontext():
        graphdef, state = nnx.split(DeepSeekModel(cfg, rngs=nnx.Rngs(0)))

        def loss(state):
            out = nnx.merge(graphdef, state)(_tokens(), indexer_loss=True)
            return jnp.mean(jnp.sin(out.logits)) + out.indexer_loss, out.indexer_loss

        step = jax.value_and_grad(loss, has_aux=True)
        fn = jax.jit(step, compiler_options={"xla_backend_optimization_level": 0})
        if mesh:
            seen = fn.lower(state).as_text()
        else:
            seen = {tuple(a.shape) for a in _avals(jax.make_jaxpr(step)(state).jaxpr)
                    if hasattr(a, "shape")}
        return jax.device_get(fn(state)), seen


def test_blocked_model_on_a_mesh_matches_one_device():
    """Batch over fsdp, heads over tensor: top-k, attention and KL run per shard (a manual
    computation); the weights' gradients equal one device's."""
    (got, grads), text = _model_grads((("fsdp", 2), ("expert", 2), ("tensor", 2)))
    (want, want_grads), _ = _model_grads()
    assert text.count("sdy.manual_computation(") >= 3
    # (measured: <= 2e-6 on the gradients; the shards sum them in another order)
    assert_close_scaled(got, want, rel=REL)
    assert_close_scaled(grads, want_grads, rel=REL)
