"""Expert-parallel MoE (moe_parallel.py) against the single-device layer, on 8 CPU devices.

Slow twin: the one-device `MoE` (dropless grouped SwiGLU, itself checked against a per-token
loop in test_grouped_matmul.py). Every case compares the output,
the aux losses, the token counts and the gradients of all parameters and of the input.
On CPU `auto` runs the allgather (`test_exchange_resolution_and_capacity`);
`ragged_all_to_all` runs its emulation, tested in test_ragged_exchange.py.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tolerance import assert_close_scaled

from mla_moe import ModelConfig, grouped_matmul, moe_parallel, sharding, update_expert_bias
from mla_moe.moe import MoE, dropless_experts
from mla_moe.router import expert_shards, placement_config, select_experts

MESHES = {
    "expert8": dict(expert=8),
    "data2_expert4": dict(data=2, expert=4),
    "fsdp2_expert2_tensor2": dict(fsdp=2, expert=2, tensor=2),
    "data8": dict(data=8),
}
EXCHANGES = ("all_to_all", "allgather")  # auto: allgather on CPU; ragged: test_ragged_exchange
# Expert weights sharded over fsdp on D and gathered inside the layer (chunk experts at a time).
FSDP_MESHES = {
    "fsdp8": dict(fsdp=8),
    "fsdp4_expert2": dict(fsdp=4, expert=2),
}
B, T = 8, 4  # 32 tokens: 4 per shard on 8 shards
# The shared 2-core CI machines spend most of these tests in LLVM: skip its optimisations.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

CFG = ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
    num_hidden_layers=2, num_attention_heads=4, q_lora_rank=None, kv_lora_rank=16,
    qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
    n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3,
    topk_method="noaux_tc", scoring_func="sigmoid", n_group=2, topk_group=2,
    norm_topk_prob=True, routed_scaling_factor=2.5,
    aux_loss_alpha=0.01, device_balance_alpha=0.02, comm_balance_alpha=0.03,
    seq_balance_alpha=0.01, router_z_loss_coef=0.001,
)


def _ep(mesh_name):
    return {**MESHES, **FSDP_MESHES}[mesh_name].get("expert", 1)


@functools.cache
def _state():
    """The layer's parameters (shapes do not depend on the exchange settings), built by one
    jitted init; with a non-zero aux-loss-free bias, so that selection and scores differ."""

    def init():
        moe = MoE(CFG, rngs=nnx.Rngs(0))
        bias = moe.router.e_score_correction_bias
        bias[...] = 0.05 * jax.random.normal(jax.random.key(7), bias.shape)
        return nnx.state(moe)

    return jax.device_get(jax.jit(init)())


def _model_state(cfg):
    graphdef = nnx.split(nnx.eval_shape(lambda: MoE(cfg, rngs=nnx.Rngs(0))))[0]
    return graphdef, _state()


def _inputs():
    kx, kc = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (B, T, CFG.hidden_size), jnp.float32)
    ct = jax.random.normal(kc, (B, T, CFG.hidden_size), jnp.float32)
    return x, ct


def _fwd_bwd(graphdef):
    def loss_fn(state, x, ct):
        out = nnx.merge(graphdef, state)(x)
        return jnp.sum(out.y_BTD * ct) + out.stats.aux_loss, (out.y_BTD, out.stats)

    def run(state, x, ct):
        (_, (y, stats)), grads = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
            state, x, ct)
        return y, stats, grads

    return run


@functools.cache
def _reference(devices: int, **overrides):
    """Single-device run; `devices` is the expert placement the balance losses use."""
    cfg = CFG.replace(expert_devices=devices, **overrides)
    graphdef, state = _model_state(cfg)
    x, ct = _inputs()
    return jax.device_get(jax.jit(_fwd_bwd(graphdef), compiler_options=FAST_COMPILE)(state, x, ct))


def _sharded(mesh_shape, **overrides):
    cfg = CFG.replace(**overrides)
    graphdef, state = _model_state(cfg)
    x, ct = _inputs()
    mesh = sharding.make_mesh(mesh_shape, config=cfg)
    with sharding.use_mesh(mesh):
        state = jax.device_put(state, sharding.state_shardings(state, mesh))
        x, ct = jax.device_put((x, ct), sharding.batch_sharding(mesh))
        run = jax.jit(_fwd_bwd(graphdef), compiler_options=FAST_COMPILE)
        return jax.device_get(run(state, x, ct))


def _placement(mesh_name):
    ep = _ep(mesh_name)
    return ep if ep > 1 else CFG.num_expert_devices


def _assert_matches_single_device(mesh_name, exchange, **overrides):
    mesh_shape = {**MESHES, **FSDP_MESHES}[mesh_name]
    y, stats, grads = _sharded(mesh_shape, moe_dispatch=exchange, **overrides)
    y_ref, stats_ref, grads_ref = _reference(_placement(mesh_name))
    assert_close_scaled(y, y_ref, rel=5e-6)
    assert set(stats.losses) == {"expert_balance", "device_balance", "comm_balance",
                                    "seq_balance", "router_z"}
    assert_close_scaled(stats.losses, stats_ref.losses, rel=1e-5)
    assert_close_scaled(stats.aux_loss, stats_ref.aux_loss, rel=1e-5)
    assert float(stats.dropped_fraction) == 0.0
    # Global counts (summed over the data shards): every shard applies the same bias update.
    np.testing.assert_array_equal(stats.tokens_per_expert, stats_ref.tokens_per_expert)
    assert stats.tokens_per_expert.sum() == B * T * CFG.num_experts_per_tok
    bias = jnp.zeros((CFG.n_routed_experts,))
    np.testing.assert_array_equal(update_expert_bias(bias, stats.tokens_per_expert, 1e-3),
                                  update_expert_bias(bias, stats_ref.tokens_per_expert, 1e-3))
    assert_close_scaled(grads, grads_ref, rel=5e-6)
    g_router = grads[0]["router"]["w_DE"][...]
    assert np.abs(g_router).max() > 0  # the gate gets a real gradient through the weights


@pytest.mark.parametrize("exchange", EXCHANGES)
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_matches_single_device(mesh_name, exchange):
    _assert_matches_single_device(mesh_name, exchange)


@pytest.mark.parametrize("mesh_name, exchange, chunk", [
    ("fsdp8", "auto", 0), ("fsdp8", "auto", 2), ("fsdp4_expert2", "allgather", 2),
    ("fsdp4_expert2", "all_to_all", 2)])
def test_fsdp_gathered_experts_match_single_device(mesh_name, exchange, chunk):
    """Weights gathered over fsdp inside the layer, `chunk` experts at a time (0: all): the
    same outputs, losses, counts and gradients as one device, nothing dropped."""
    _assert_matches_single_device(mesh_name, exchange, expert_gather_chunk=chunk)


@pytest.mark.parametrize("mesh_name", ["fsdp8", "fsdp4_expert2"])
def test_megablox_sorted_once_matches_single_device(mesh_name, monkeypatch):
    """The TPU path with experts gathered in chunks (megablox, interpret mode here): the rows
    sorted once per layer, weights gathered over fsdp 2 experts at a time with their gradients
    reduce-scattered by the custom VJP: one device's outputs, losses and gradients."""
    monkeypatch.setattr(moe_parallel, "default_implementation", lambda *a: "megablox")
    _assert_matches_single_device(mesh_name, "allgather", expert_gather_chunk=2)


@pytest.mark.parametrize("exchange", EXCHANGES)
def test_unfused_gate_up_matches_single_device(exchange, monkeypatch):
    """The test layer's experts are narrow enough for the fused gate/up operand; the
    two-operand form (wide experts) gives the same numbers inside shard_map too."""
    monkeypatch.setattr(grouped_matmul, "FUSE_MAX_WIDTH", 0)
    _assert_matches_single_device("fsdp2_expert2_tensor2", exchange)


def test_exchange_resolution_and_capacity():
    auto = CFG.replace(moe_dispatch="auto")  # K = 3: gather up to EP = 3
    assert moe_parallel.resolve_exchange(auto, 2, "cpu") == "allgather"
    assert moe_parallel.resolve_exchange(auto.replace(num_experts_per_tok=8), 8, "gpu") == \
        "allgather"
    assert moe_parallel.resolve_exchange(auto, 8, "cpu") == "allgather"  # CPU: always
    assert moe_parallel.resolve_exchange(auto, 8, "gpu") == "ragged_all_to_all"
    assert moe_parallel.resolve_exchange(CFG.replace(moe_dispatch="ragged_all_to_all"), 8,
                                         "cpu") == "ragged_all_to_all"  # emulated
    # Never-drop size: one source can send at most T * min(K, E/EP) rows to one destination.
    assert moe_parallel.exchange_capacity(4, CFG, 8) == 4 * 1
    assert moe_parallel.exchange_capacity(4, CFG, 2) == 4 * 3
    c = CFG.replace(dispatch_capacity_factor=0.5)
    assert moe_parallel.exchange_capacity(4, c, 2) == math.ceil(0.5 * 4 * 3 / 2)


def _routing_numpy(cfg, graphdef, state, x):
    moe = nnx.merge(graphdef, state)
    x_TD = x.reshape(-1, cfg.hidden_size)
    r = moe.router(x_TD)
    aff = np.take_along_axis(np.asarray(r.scores_TE), np.asarray(r.experts_TK), axis=-1)
    return np.asarray(r.experts_TK), np.asarray(r.weights_TK), aff


@pytest.mark.parametrize("factor", [0.5])
def test_small_capacity_drops_exactly_as_documented(factor):
    """expert=8, all_to_all: per (source shard, destination shard) pair, the assignments
    ranked >= X by router score are dropped; the output equals the dropless layer with
    exactly those assignments removed."""
    ep, n_src = 8, 8
    cfg = CFG.replace(moe_dispatch="all_to_all", dispatch_capacity_factor=factor)
    graphdef, state = _model_state(cfg)
    x, _ = _inputs()
    experts, weights, aff = _routing_numpy(cfg, graphdef, state, x)
    t_all, k = experts.shape
    t_s = t_all // n_src
    cap = moe_parallel.exchange_capacity(t_s, cfg, ep)
    assert cap == max(1, math.ceil(factor * t_s * k / ep))
    keep = np.ones_like(experts, bool)
    e_local = cfg.n_routed_experts // ep
    for s in range(n_src):
        rows = slice(s * t_s, (s + 1) * t_s)
        dest = experts[rows] // e_local
        for p in range(ep):
            ts, ks = np.nonzero(dest == p)
            # highest affinity first; ties by token, then slot (the flat assignment order)
            order = sorted(range(len(ts)), key=lambda i: (-aff[rows][ts[i], ks[i]],
                                                          ts[i] * k + ks[i]))
            for i in order[cap:]:
                keep[s * t_s + ts[i], ks[i]] = False
    n_dropped = int((~keep).sum())
    assert n_dropped > 0

    mesh = sharding.make_mesh(dict(expert=ep), config=cfg)
    with sharding.use_mesh(mesh):
        st = jax.device_put(state, sharding.state_shardings(state, mesh))
        xs = jax.device_put(x, sharding.batch_sharding(mesh))
        out = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x),
                      compiler_options=FAST_COMPILE)(st, xs)
    assert float(out.stats.dropped_fraction) * experts.size == pytest.approx(n_dropped, abs=1e-3)

    moe = nnx.merge(graphdef, state)
    x_TD = x.reshape(-1, cfg.hidden_size)
    y_TD, _ = dropless_experts(x_TD, jnp.asarray(experts), jnp.asarray(weights * keep),
                               *moe.expert_weights(jnp.float32))
    y_ref = y_TD.reshape(x.shape) + moe.shared(x)
    assert_close_scaled(np.asarray(out.y_BTD), np.asarray(y_ref), rel=1e-6)


def test_device_limited_routing_uses_real_placement():
    """expert=4, M=2: each token's experts lie on <= 2 shards, the ones with the best
    affinity; the layer equals one device run with the same placement."""
    ep, m = 4, 2
    over = dict(device_limited_routing=True, device_limit=m, moe_dispatch="all_to_all",
                num_experts_per_tok=3)
    cfg = CFG.replace(**over)
    graphdef, state = _model_state(cfg)
    x, _ = _inputs()
    moe = nnx.merge(graphdef, state)
    mesh = sharding.make_mesh(dict(data=2, expert=ep), config=cfg)
    x_TD = x.reshape(-1, cfg.hidden_size)
    scores = moe.router(x_TD).scores_TE
    bias = moe.router.e_score_correction_bias[...]
    with sharding.use_mesh(mesh):
        assert expert_shards(cfg) == ep
        experts, _ = jax.jit(lambda s, b: select_experts(s, b, cfg))(scores, bias)
    experts = np.asarray(experts)
    shards = experts // (cfg.n_routed_experts // ep)
    per_token = [len(set(row)) for row in shards]
    assert max(per_token) <= m and min(per_token) >= 1
    choice = np.asarray(scores + bias).reshape(-1, ep, cfg.n_routed_experts // ep).max(-1)
    best = np.argsort(-choice, axis=-1)[:, :m]
    for row, top in zip(shards, best, strict=True):
        assert set(row) <= set(top)
    # Without the limit some token would use more than M shards (the limit really acts).
    free, _ = select_experts(scores, bias, cfg.replace(device_limited_routing=False))
    assert max(len(set(r)) for r in np.asarray(free) // 2) > m

    y, stats, grads = _sharded(dict(data=2, expert=ep), **over)
    y_ref, stats_ref, grads_ref = _reference(ep, **over)
    assert_close_scaled(y, y_ref, rel=5e-6)
    assert_close_scaled(stats.losses, stats_ref.losses, rel=1e-5)
    assert_close_scaled(grads, grads_ref, rel=5e-6)


def test_device_losses_use_mesh_placement():
    """Under expert=8 the device/comm losses use D=8 blocks of one expert (not n_group=2)."""
    _, stats, _ = _sharded(MESHES["expert8"], moe_dispatch="allgather")
    d8 = _reference(8)[1].losses
    d2 = _reference(2)[1].losses
    assert_close_scaled(stats.losses["comm_balance"], d8["comm_balance"], rel=1e-5)
    assert abs(float(d8["comm_balance"]) - float(d2["comm_balance"])) > 1e-3


def test_no_mesh_is_single_device_path():
    assert sharding.active_mesh() is None
    assert not moe_parallel.use_parallel(CFG)
    assert placement_config(CFG) is CFG


def _assert_close_to_scale(got, want, rel):
    """Per leaf: max |got - want| <= rel x max |want| (the error against the magnitude of what
    is compared, not element by element)."""
    for path, g, w in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got),
                          jax.tree.leaves(want), strict=True):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        scale = max(float(np.abs(w).max()), 1e-30)
        err = float(np.abs(g - w).max())
        assert err <= rel * scale, f"{jax.tree_util.keystr(path[0])}: {err=} vs {scale=}"


def test_capacity_impl_under_a_mesh_matches_single_device():
    """moe_impl="capacity" under fsdp x expert x tensor: the single-device algorithm under the
    compiler's partitioning gives the unsharded layer's output, drops and gradients."""
    mesh_name = "fsdp2_expert2_tensor2"
    over = dict(moe_impl="capacity", capacity_factor=1.0)
    y, stats, grads = _sharded(MESHES[mesh_name], **over)
    y_ref, stats_ref, grads_ref = _reference(_placement(mesh_name), **over)
    assert float(stats_ref.dropped_fraction) > 0.05  # the capacity really drops
    assert float(stats.dropped_fraction) == float(stats_ref.dropped_fraction)
    np.testing.assert_array_equal(stats.tokens_per_expert, stats_ref.tokens_per_expert)
    _assert_close_to_scale(y, y_ref, 1e-6)
    _assert_close_to_scale(stats.losses, stats_ref.losses, 1e-6)
    _assert_close_to_scale(grads, grads_ref, 1e-5)


def test_is_dropless_follows_the_exchange_buffers():
    auto = CFG.replace(moe_dispatch="auto")
    assert moe_parallel.is_dropless(auto, 1, "tpu")  # pure FSDP: weights to the tokens
    assert moe_parallel.is_dropless(auto, 8, "cpu")  # allgather
    ragged = CFG.replace(moe_dispatch="ragged_all_to_all")
    assert moe_parallel.is_dropless(ragged, 8, "tpu")  # receive buffer for the worst case
    assert not moe_parallel.is_dropless(ragged.replace(dispatch_capacity_factor=2.0), 8, "tpu")
    assert not moe_parallel.is_dropless(ragged.replace(dispatch_capacity_factor=2.0), 8, "cpu")
    packed = CFG.replace(moe_dispatch="all_to_all", dispatch_capacity_factor=1.0)
    assert not moe_parallel.is_dropless(packed, 4, "tpu")
    assert moe_parallel.is_dropless(packed, 1, "tpu")  # X = T * K: the whole send buffer
    assert not moe_parallel.is_dropless(CFG.replace(moe_impl="capacity"), 1, "tpu")
