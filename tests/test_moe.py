"""DeepSeekMoE: router selection, both expert paths vs a per-expert loop, drops, balance."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_configs import small_config
from tolerance import assert_close_scaled

from mla_moe import DeepSeekModel, update_expert_bias
from mla_moe.balance import balance_losses
from mla_moe.moe import MoE, expert_capacity
from mla_moe.router import select_experts
from mla_moe.train.expert_bias import apply_expert_bias_update


def moe_loop_reference(moe: MoE, x_BTD, keep_TK=None):
    """The obvious MoE: every expert applied to every token, masked by the routing."""
    b, t, d = x_BTD.shape
    x_TD = x_BTD.reshape(-1, d)
    routing = moe.router(x_TD)
    w_TK = routing.weights_TK if keep_TK is None else routing.weights_TK * keep_TK
    y_TD = jnp.zeros_like(x_TD)
    for e in range(moe.config.n_routed_experts):
        h = jax.nn.silu(x_TD @ moe.gate_EDF[...][e]) * (x_TD @ moe.up_EDF[...][e])
        coef_T = jnp.sum(jnp.where(routing.experts_TK == e, w_TK, 0.0), axis=-1)
        y_TD = y_TD + coef_T[:, None] * (h @ moe.down_EFD[...][e])
    y = y_TD.reshape(b, t, d)
    return y + moe.shared(x_BTD) if moe.shared is not None else y


CONFIGS = {
    "v3_sigmoid_noaux": dict(),
    "v2_group_limited": dict(topk_method="group_limited_greedy", scoring_func="softmax",
                             norm_topk_prob=False, routed_scaling_factor=16.0),
    "v2_lite_greedy": dict(topk_method="greedy", scoring_func="softmax", n_group=1,
                           topk_group=1, norm_topk_prob=False, n_shared_experts=2),
}


def _moe(name, seed=0, **changes):
    moe = MoE(small_config(**CONFIGS[name], **changes), rngs=nnx.Rngs(seed))
    if moe.router.e_score_correction_bias is not None:
        b = moe.router.e_score_correction_bias
        b[...] = 0.3 * jax.random.normal(jax.random.key(seed + 9), b.shape)
    return moe


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("impl", ["dropless", "capacity"])
def test_expert_paths_equal_the_loop_reference(name, impl):
    # capacity_factor = E / K: every expert can take every token, so nothing drops.
    moe = _moe(name, moe_impl=impl, capacity_factor=4.0)
    x = jax.random.normal(jax.random.key(1), (2, 11, moe.config.hidden_size))

    @nnx.jit
    def run(moe, x):
        def fast(moe, x):
            out = moe(x)
            return jnp.sum(jnp.tanh(out.y_BTD)), (out.y_BTD, out.stats)

        def slow(moe, x):
            y = moe_loop_reference(moe, x)
            return jnp.sum(jnp.tanh(y)), y

        g_fast, (y_fast, stats) = nnx.grad(fast, argnums=(0, 1), has_aux=True)(moe, x)
        g_slow, y_slow = nnx.grad(slow, argnums=(0, 1), has_aux=True)(moe, x)
        return y_fast, y_slow, g_fast, g_slow, stats

    y_fast, y_slow, g_fast, g_slow, stats = run(moe, x)
    chex.assert_shape(y_fast, x.shape)
    assert_close_scaled(y_fast, y_slow, rel=1e-5)
    # With routed_scaling_factor=16 terms of ~1 cancel to ~1e-2: the bound is per leaf,
    # relative to the leaf's largest |gradient| (measured: 2.4e-6).
    assert_close_scaled(g_fast, g_slow, rel=1e-5)
    assert float(stats.dropped_fraction) == 0.0
    assert float(stats.tokens_per_expert.sum()) == 2 * 11 * moe.config.num_experts_per_tok


def test_capacity_drops_exactly_the_lowest_affinity_assignments():
    moe = _moe("v2_lite_greedy", moe_impl="capacity", capacity_factor=0.5)
    c = moe.config
    x = jax.random.normal(jax.random.key(4), (1, 24, c.hidden_size))
    capacity = expert_capacity(24, c)
    assert capacity == 3  # ceil(0.5 * 24 * 2 / 8)
    routing = moe.router(x.reshape(24, -1))
    experts = np.asarray(routing.experts_TK)
    affinity = np.take_along_axis(np.asarray(routing.scores_TE), experts, axis=-1)
    # Documented semantics, written out: per expert, keep the `capacity` highest-affinity
    # assignments (ties by token order), drop the rest.
    keep = np.zeros_like(experts, dtype=bool)
    for e in range(c.n_routed_experts):
        t_idx, k_idx = np.nonzero(experts == e)
        order = sorted(range(len(t_idx)), key=lambda i: (-affinity[t_idx[i], k_idx[i]], t_idx[i]))
        for i in order[:capacity]:
            keep[t_idx[i], k_idx[i]] = True
    expected_dropped = 1.0 - keep.sum() / keep.size
    assert expected_dropped > 0.1  # the test really drops something
    out = moe(x)
    np.testing.assert_allclose(float(out.stats.dropped_fraction), expected_dropped, rtol=1e-6)
    reference = moe_loop_reference(moe, x, keep_TK=jnp.asarray(keep, jnp.float32))
    assert_close_scaled(out.y_BTD, reference, rel=1e-6)


def _select_reference(scores, bias, c):
    """Router selection written with numpy loops, per token."""
    experts, weights = [], []
    e, g = c.n_routed_experts, c.n_group
    for s in scores:
        choice = s + (bias if bias is not None else 0)
        allowed = np.ones(e, bool)
        if c.topk_method != "greedy":
            groups = choice.reshape(g, e // g)
            if c.topk_method == "noaux_tc":
                gscore = np.sort(groups, axis=1)[:, -2:].sum(1)
            else:
                gscore = groups.max(1)
            top = np.argsort(-gscore, kind="stable")[: c.topk_group]
            allowed = np.repeat(np.isin(np.arange(g), top), e // g)
        masked = np.where(allowed, choice, -np.inf)
        idx = np.argsort(-masked, kind="stable")[: c.num_experts_per_tok]
        w = s[idx]
        if c.norm_topk_prob:
            w = w / w.sum()
        experts.append(sorted(idx))
        weights.append(dict(zip(idx, w * c.routed_scaling_factor)))
    return experts, weights


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_router_selection_matches_a_per_token_reference(name):
    c = small_config(**CONFIGS[name])
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(40, c.n_routed_experts)).astype(np.float32)
    scores = jax.nn.softmax(logits) if c.scoring_func == "softmax" else jax.nn.sigmoid(logits)
    scores = np.asarray(scores)
    bias = rng.normal(size=c.n_routed_experts).astype(np.float32) * 0.3 \
        if c.topk_method == "noaux_tc" else None
    idx, w = select_experts(jnp.asarray(scores), None if bias is None else jnp.asarray(bias), c)
    ref_idx, ref_w = _select_reference(scores, bias, c)
    for t in range(40):
        assert sorted(np.asarray(idx[t]).tolist()) == ref_idx[t]
        for k in range(c.num_experts_per_tok):
            assert float(w[t, k]) == pytest.approx(ref_w[t][int(idx[t, k])], rel=1e-5)


def test_noaux_bias_steers_selection_but_not_weights():
    c = small_config()
    scores = jax.nn.sigmoid(jax.random.normal(jax.random.key(0), (16, c.n_routed_experts)))
    bias = jnp.zeros(c.n_routed_experts).at[5].set(10.0)
    idx, w = select_experts(scores, bias, c)
    assert bool(jnp.all(jnp.any(idx == 5, axis=-1)))  # every token picks expert 5
    w_sum = w.sum(-1)
    np.testing.assert_allclose(w_sum, c.routed_scaling_factor, rtol=1e-5)  # normalised g


def test_balance_losses_match_hand_computation():
    c = small_config(aux_loss_alpha=0.5, device_balance_alpha=0.25, comm_balance_alpha=0.125,
                     seq_balance_alpha=2.0, router_z_loss_coef=0.0, expert_devices=4,
                     device_limit=2)
    rng = np.random.default_rng(1)
    b, t, e, k, d, m = 2, 6, 8, 2, 4, 2
    logits = rng.normal(size=(b, t, e)).astype(np.float32)
    scores = np.asarray(jax.nn.sigmoid(logits))
    experts = np.stack([np.stack([rng.choice(e, k, replace=False) for _ in range(t)])
                        for _ in range(b)])
    total, parts = balance_losses(jnp.asarray(scores), jnp.asarray(experts),
                                  jnp.asarray(logits), c)
    exp_bal = dev_bal = comm_bal = seq_bal = 0.0
    for bi in range(b):
        counts = np.zeros(e)
        sent = np.zeros(d)
        for ti in range(t):
            for ex in experts[bi, ti]:
                counts[ex] += 1
            sent += np.isin(np.arange(d), experts[bi, ti] // (e // d))
        f = counts * e / (k * t)
        p = scores[bi].mean(0)
        exp_bal += (f * p).sum() / b
        f_dev = f.reshape(d, -1).mean(1)
        p_dev = p.reshape(d, -1).sum(1)
        dev_bal += (f_dev * p_dev).sum() / b
        comm_bal += (sent * d / (m * t) * p_dev).sum() / b
        p_norm = (scores[bi] / scores[bi].sum(-1, keepdims=True)).mean(0)
        seq_bal += (f * p_norm).sum() / b
    assert float(parts["expert_balance"]) == pytest.approx(exp_bal, rel=1e-5)
    assert float(parts["device_balance"]) == pytest.approx(dev_bal, rel=1e-5)
    assert float(parts["comm_balance"]) == pytest.approx(comm_bal, rel=1e-5)
    assert float(parts["seq_balance"]) == pytest.approx(seq_bal, rel=1e-5)
    assert "router_z" not in parts
    expected = 0.5 * exp_bal + 0.25 * dev_bal + 0.125 * comm_bal + 2.0 * seq_bal
    assert float(total) == pytest.approx(expected, rel=1e-5)


def test_update_expert_bias_moves_against_the_load():
    bias = jnp.array([0.0, 0.1, -0.1, 0.0])
    counts = jnp.array([10.0, 2.0, 4.0, 4.0])  # mean 5
    new = update_expert_bias(bias, counts, 0.01)
    np.testing.assert_allclose(new, [-0.01, 0.11, -0.09, 0.01], atol=1e-7)


def test_apply_expert_bias_update_touches_each_layer_with_its_own_counts():
    model = DeepSeekModel(small_config(num_hidden_layers=3, first_k_dense_replace=1),
                          rngs=nnx.Rngs(0))
    routers = model.moe_routers()
    assert len(routers) == 2
    counts = (jnp.arange(8.0), -jnp.arange(8.0))
    apply_expert_bias_update(model, counts, 0.5)
    bias = model.groups[1].ffn.router.e_score_correction_bias[...]
    np.testing.assert_allclose(bias[0], 0.5 * np.sign(3.5 - np.arange(8.0)))
    np.testing.assert_allclose(bias[1], 0.5 * np.sign(-3.5 + np.arange(8.0)))


def test_moe_routers_of_an_unstacked_model_follow_the_router_stats():
    """Unstacked (per-layer modules, as decoding runs): one router per MoE layer, main layers
    then MTP, in the order of `ModelOutput.router`, and the bias update reaches each one."""
    model = DeepSeekModel(small_config(num_hidden_layers=3, first_k_dense_replace=1,
                                       num_nextn_predict_layers=1), rngs=nnx.Rngs(0))
    stacked = model.moe_routers()
    unstacked = model.unstacked()
    routers = unstacked.moe_routers()
    assert [i for _, i in stacked] == [0, 1, None]
    assert [i for _, i in routers] == [None, None, None]
    assert routers[0][0] is unstacked.groups[1][0].ffn.router
    assert routers[1][0] is unstacked.groups[1][1].ffn.router
    assert routers[2][0] is unstacked.mtp[0].layer.ffn.router
    for (r, _), (s, i) in zip(routers, stacked, strict=True):
        w = s.w_DE[...] if i is None else s.w_DE[...][i]
        np.testing.assert_array_equal(r.w_DE[...], w)
    out = unstacked(jnp.ones((1, 4), jnp.int32))
    assert len(out.router) == len(routers)
    counts = [jnp.arange(8.0) * (i + 1) for i in range(3)]
    apply_expert_bias_update(unstacked, counts, 0.5)
    for r, _ in routers:
        np.testing.assert_allclose(r.e_score_correction_bias[...],
                                   0.5 * np.sign(3.5 - np.arange(8.0)))
