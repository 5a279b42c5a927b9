"""Context parallelism (context_parallel.py): the zigzag layout, its balance of attention work,
the MLA layer on the Pallas kernel, a V3.2 layer (the indexer's top-k, sparse attention and KL)
and a whole-model train step, with each sequence split over `context`, equal to one device."""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_configs import small_config
from tolerance import assert_close_scaled

from configs import tiny
from mla_moe import MLA, DeepSeekModel, attention, context_parallel, key_blocks, sharding
from mla_moe import indexer as dsa
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


# --- V3.2: the indexer's selection, sparse attention and KL under context parallelism ---------
V32_T = 32  # > index_topk = 6: sparse rows; shards of 16 queries, 4 blocks of 5 (one padded)
V32_SEGMENTS = [[0] * 32, [0] * 11 + [1] * 21, [0] * 5 + [1] * 20 + [2] * 7, [1] * 32]
V32_MESHES = {
    "sparse-context2": ("sparse", dict(context=2)),  # data=4
    "sparse-data2_context2_fsdp2": ("sparse", dict(context=2, fsdp=2)),
    "sparse-context2_tensor2": ("sparse", dict(context=2, tensor=2)),  # heads split
    "dense-data2_context2_fsdp2": ("dense", dict(context=2, fsdp=2)),  # the warm-up stage
}


def _v32_config(stage):
    # Many indexer heads: ties in the top-k are unlikely, so the index sets are comparable.
    return small_config(vocab_size=64, num_attention_heads=4, index_n_heads=16,
                        index_head_dim=8, index_topk=6, index_block_q=5, index_block_k=7,
                        index_attention=stage)


def _v32_inputs():
    """x, the cotangents of the output and the indexer loss, rope positions, segment ids."""
    kx, kg = jax.random.split(jax.random.key(6))
    x_BTD = jax.random.normal(kx, (4, V32_T, 32))
    seg_BT = np.asarray(V32_SEGMENTS, np.int32)
    pos_BT = np.stack([np.concatenate([np.arange(n) for n in np.unique(row, return_counts=True)[1]])
                       for row in seg_BT]).astype(np.int32)
    return x_BTD, (jax.random.normal(kg, x_BTD.shape), jnp.float32(0.7)), pos_BT, seg_BT


@functools.cache
def _v32_layer(stage, mesh_name=None):
    """((output, indexer loss), their vjp w.r.t. the parameters and x, the selected keys
    [B, T, K] or None) of one V3.2 MLA layer, in sequence order: on one device (the dense
    [B, T, S] path and the dense top-k) or, with mesh_name, on that mesh in the zigzag
    layout (the keys the layer selected recorded on their way out)."""
    cfg = _v32_config(stage)
    graphdef, params = nnx.split(MLA(cfg, rngs=nnx.Rngs(2)))
    x_BTD, cts, pos_BT, seg_BT = _v32_inputs()
    chosen = []

    def layer(params, x_BTD, pos_BT, seg_BT):
        out_BTD, _, loss = nnx.merge(graphdef, params).attend(x_BTD, pos_BT, seg_BT,
                                                              indexer_loss=True)
        return (out_BTD, loss), (chosen.pop() if chosen else None)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def forward_and_vjp(params, x_BTD, pos_BT, seg_BT, cts):
        outs, vjp, idx_BTK = jax.vjp(functools.partial(layer, pos_BT=pos_BT, seg_BT=seg_BT),
                                     params, x_BTD, has_aux=True)
        return outs, vjp(cts), idx_BTK

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def dense_top_k(params, x_BTD, pos_BT, seg_BT):
        mla = nnx.merge(graphdef, params)
        ix, b, t = mla.indexer, *x_BTD.shape[:2]
        scores = dsa.index_scores(ix.queries(mla.query_latent(x_BTD), pos_BT), ix.weights(x_BTD),
                                  ix.keys(x_BTD, pos_BT))
        return dsa.top_k(scores, attention.causal_segment_mask(seg_BT, b, t), cfg.index_topk)

    if mesh_name is None:
        (outs, grads, _) = forward_and_vjp(params, x_BTD, pos_BT, seg_BT, cts)
        sparse = stage == "sparse"
        return outs, grads, dense_top_k(params, x_BTD, pos_BT, seg_BT) if sparse else None

    def recording(*args, **kwargs):
        out = real(*args, **kwargs)
        chosen.append(out.idx_BTK)
        return out

    real = context_parallel.indexed_latent_attention
    zig = functools.partial(context_parallel.zigzag, context=2)
    unzig = functools.partial(context_parallel.unzigzag, context=2)
    mesh = sharding.make_mesh(dict(data=-1, **V32_MESHES[mesh_name][1]), config=cfg)
    with pytest.MonkeyPatch.context() as patch, sharding.use_mesh(mesh):
        patch.setattr(context_parallel, "indexed_latent_attention", recording)
        (out_BTD, loss), (grads, dx_BTD), idx_BTK = forward_and_vjp(
            params, zig(x_BTD), zig(pos_BT), zig(seg_BT), (zig(cts[0]), cts[1]))
    return ((unzig(out_BTD), loss), (grads, unzig(dx_BTD)),
            None if idx_BTK is None else unzig(idx_BTK))


def _key_sets(idx_BTK):
    """Each query's selected keys as a frozenset (-1 names none)."""
    return [[frozenset(int(s) for s in row if s >= 0) for row in seq]
            for seq in np.asarray(idx_BTK)]


@pytest.mark.parametrize("mesh_name", list(V32_MESHES))
def test_v32_layer_with_context_matches_one_device(mesh_name):
    """A V3.2 MLA layer with packed documents and T = 32 > index_topk = 6, each sequence split
    over context 2 (the indexer's keys gathered with the latent, each shard's queries taking
    their top-k over the whole sequence; dsa_blocked's top-k, sparse attention and KL on local
    queries x global keys), against one device's dense path: the output, the indexer's KL,
    the gradients w.r.t. every weight and the input, and (sparse stage) each query's selected
    keys. The dense stage (the warm-up) attends to every key and takes the KL over them."""
    stage = V32_MESHES[mesh_name][0]
    (out, kl), (grads, dx), idx = _v32_layer(stage, mesh_name)
    (want_out, want_kl), (want_grads, want_dx), want_idx = _v32_layer(stage)
    assert float(want_kl) > 0.1  # a real divergence
    if stage == "sparse":
        sets, want_sets = _key_sets(idx), _key_sets(want_idx)
        assert sets == want_sets
        assert sum(len(s) == 6 for seq in want_sets for s in seq[6:]) > 0  # a real selection
    else:
        assert idx is None
    # float32 sums in another order (blocks of queries and keys, gradients reduce-scattered).
    assert_close_scaled((out, kl, dx), (want_out, want_kl, want_dx), rel=GRAD_REL)
    assert_close_scaled(grads, want_grads, rel=GRAD_REL, err_msg="params")
    for path, g in nnx.to_flat_state(want_grads):
        assert float(jnp.max(jnp.abs(g[...]))) > 0, path  # the indexer's too


def test_v32_layer_without_its_loss_with_context_matches_one_device():
    """The sparse stage's forward alone (evaluation: no indexer loss, the top-k and the sparse
    attention only) under context 2 equals one device's."""
    cfg = _v32_config("sparse")
    graphdef, params = nnx.split(MLA(cfg, rngs=nnx.Rngs(2)))
    x_BTD, _, pos_BT, seg_BT = _v32_inputs()
    layer = jax.jit(lambda p, *a: nnx.merge(graphdef, p)(*a)[0], compiler_options=FAST_COMPILE)
    want_BTD = layer(params, x_BTD, pos_BT, seg_BT)
    zig = functools.partial(context_parallel.zigzag, context=2)
    with sharding.use_mesh(sharding.make_mesh(dict(data=-1, context=2), config=cfg)):
        out_BTD = layer(params, zig(x_BTD), zig(pos_BT), zig(seg_BT))
    assert_close_scaled(context_parallel.unzigzag(out_BTD, 2), want_BTD, rel=GRAD_REL)


def _avals(jaxpr):
    """Every intermediate's abstract value in a jaxpr, nested ones (shard_map, scan, remat)
    too."""
    for eqn in jaxpr.eqns:
        yield from (v.aval for v in eqn.outvars)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    yield from _avals(sub)


@pytest.mark.parametrize("stage", ["sparse", "dense"])
def test_v32_layer_with_context_holds_nothing_of_t_by_s(stage, monkeypatch):
    """The layer's forward and backward under context 2 (T = 56: 28 queries per shard, keys
    padded to 56 by the key blocks, queries to 30 by the query blocks) build no array with
    two sequence-long axes: memory linear in T per shard (the dense stage's attention in key
    blocks of 8, as it runs at lengths past KEY_BLOCK)."""
    monkeypatch.setattr(context_parallel, "KEY_BLOCK", 8)
    cfg = _v32_config(stage)
    graphdef, params = nnx.split(MLA(cfg, rngs=nnx.Rngs(2)))
    t = 56
    x_BTD = jax.random.normal(jax.random.key(7), (4, t, cfg.hidden_size))

    def step(params, x_BTD):
        def layer(params, x_BTD):
            out_BTD, _, loss = nnx.merge(graphdef, params).attend(x_BTD, indexer_loss=True)
            return jnp.sum(jnp.sin(out_BTD)) + loss

        return jax.grad(layer, argnums=(0, 1))(params, x_BTD)

    mesh = sharding.make_mesh(dict(data=-1, context=2), config=cfg)
    with sharding.use_mesh(mesh):
        jaxpr = jax.make_jaxpr(step)(params, x_BTD).jaxpr
    shapes = {tuple(a.shape) for a in _avals(jaxpr) if hasattr(a, "shape")}
    lengths = {t, t // 2, 30}  # no other dimension of the layer has these sizes
    assert not {s for s in shapes if sum(d in lengths for d in s) >= 2}
    # The walk reaches the shard's gathered indexer keys and a block's attention scores.
    assert (1, t, cfg.index_head_dim) in shapes
    n = cfg.num_attention_heads
    assert ((1, cfg.index_block_q, n, cfg.index_topk) if stage == "sparse"
            else (1, n, t // 2, 8)) in shapes


# --- a train step on the mesh against one device --------------------------------------------------
def _batch(vocab_size=CFG.vocab_size, t=T):
    """Packed rows: documents of several lengths (positions restart per document, segment ids
    change), a few zero target weights."""
    k1, k2 = jax.random.split(jax.random.key(3))
    tokens = jax.random.randint(k1, (B, t + 1), 0, vocab_size)
    cuts = [[t], [5, t], [9, 13, t], [2, t]]
    seg = np.concatenate([[np.repeat(np.arange(len(c)), np.diff([0, *c]))] for c in cuts])
    pos = np.concatenate([[np.concatenate([np.arange(n) for n in np.diff([0, *c])])]
                          for c in cuts])
    weights = (jax.random.uniform(k2, (B, t)) > 0.1).astype(jnp.float32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "positions": jnp.asarray(pos, jnp.int32), "segment_ids": jnp.asarray(seg, jnp.int32),
            "weights": weights}


@functools.cache
def _setup():
    model = DeepSeekModel(CFG, rngs=nnx.Rngs(0))
    graphdef, params, extra = nnx.split(model, nnx.Param, ...)
    return graphdef, jax.device_get(params), jax.device_get(extra), jax.device_get(_batch())


def _grads_fn(graphdef, cfg=CFG, dsa_stage="off"):
    step_cfg = step_lib.StepConfig(loss_chunk_tokens=CHUNK_TOKENS, dsa_stage=dsa_stage)

    def fn(params, extra, batch):
        loss, metrics, grads = step_lib._grads_and_aux(params, extra, batch, graphdef, cfg,
                                                       step_cfg)
        return loss, metrics["ce_sum"], metrics["mtp_loss"], metrics["indexer_loss"], grads

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
                     out_shardings=(None, None, None, None, p_sh), compiler_options=FAST_COMPILE)
        loss, ce, mtp, _, grads = jax.device_get(fn(*jax.device_put((params, extra, batch),
                                                                    (p_sh, e_sh, b_sh))))
    loss_ref, ce_ref, mtp_ref, _, grads_ref = _reference()
    assert np.isfinite(loss) and mtp_ref > 0
    assert_close_scaled((loss, ce, mtp), (loss_ref, ce_ref, mtp_ref), rel=1e-6)
    flat = ckpt_lib.flatten_state
    assert set(flat(grads)) == set(flat(grads_ref))
    assert_close_scaled(flat(grads), flat(grads_ref), rel=GRAD_REL, err_msg="grads")


@pytest.mark.slow
def test_v32_train_step_with_context_matches_one_device():
    """V3.2 at runlocal sizes (configs/deepseek_v32.py: a scanned, rematerialised stack, here
    of one MoE layer, in float32; T = 32 > index_topk = 16), sparse training: the loss, CE
    and indexer KL and every gradient leaf with data 2 x context 2 x fsdp 2 (dsa_blocked's
    functions on local queries x global keys), against one device (whose 32 tokens take the
    dense [B, T, S] path)."""
    v32 = importlib.import_module("configs.deepseek_v32").get_config("runlocal")
    cfg = config_lib.model_config(v32).replace(
        num_hidden_layers=1, first_k_dense_replace=0, num_nextn_predict_layers=0,
        dtype="float32", initializer_range=0.2)  # larger weights: a KL well above 0
    assert cfg.index_topk < v32.train.seq_len == 32
    graphdef, params, extra = nnx.split(DeepSeekModel(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    batch = _batch(cfg.vocab_size, v32.train.seq_len)
    fn = _grads_fn(graphdef, cfg, dsa_stage="sparse")
    want = jax.device_get(jax.jit(fn, compiler_options=FAST_COMPILE)(params, extra, batch))
    mesh = sharding.make_mesh(dict(data=2, context=2, fsdp=2), config=cfg)
    with sharding.use_mesh(mesh):
        p_sh = sharding.state_shardings(params, mesh)
        e_sh = sharding.state_shardings(extra, mesh)
        b_sh = sharding.batch_sharding(mesh)
        got = jax.device_get(jax.jit(
            fn, in_shardings=(p_sh, e_sh, b_sh), out_shardings=(None,) * 4 + (p_sh,),
            compiler_options=FAST_COMPILE)(*jax.device_put((params, extra, batch),
                                                          (p_sh, e_sh, b_sh))))
    assert float(want[3]) > 0.1  # the indexer's KL
    loss, ce, _, kl, grads = got
    assert_close_scaled((loss, ce, kl), (want[0], want[1], want[3]), rel=1e-6)
    flat = ckpt_lib.flatten_state
    assert set(flat(grads)) == set(flat(want[4]))
    assert_close_scaled(flat(grads), flat(want[4]), rel=GRAD_REL, err_msg="grads")


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
    c.model.index_n_heads = 2  # V3.2: the indexer's keys gathered with the latent
    config_lib.validate(c)
