"""Decoder: scan/remat vs the plain loop, MTP and its loss, dtypes, layer layouts."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_configs import small_config
from tolerance import assert_close_scaled

from mla_moe import DeepSeekModel
from mla_moe.decoder import layer_groups
from mla_moe.losses import cross_entropy, mtp_loss


def _loss_and_grad(model, tokens):
    @nnx.jit
    def step(model, tokens):
        def loss(model):
            out = model(tokens)
            ce, n = cross_entropy(out.logits[:, :-1], tokens[:, 1:])
            return ce / n + out.aux_loss, out.logits

        return nnx.value_and_grad(loss, has_aux=True)(model)

    return step(model, tokens)


@pytest.fixture(scope="module")
def plain_run():
    cfg = small_config(num_hidden_layers=3, first_k_dense_replace=1)
    tokens = jax.random.randint(jax.random.key(0), (2, 10), 0, cfg.vocab_size)
    plain = DeepSeekModel(cfg, rngs=nnx.Rngs(3))
    return cfg, tokens, nnx.state(plain), _loss_and_grad(plain, tokens)


@pytest.mark.parametrize("scan, remat", [(True, "none"), (False, "full"), (True, "dots"),
                                         (True, "dots_no_batch"), (False, "save_attention_out"),
                                         (True, "offload_layer_input"),
                                         (False, "offload_layer_input_attention_out")])
def test_scan_and_remat_equal_the_plain_loop(plain_run, scan, remat):
    cfg, tokens, plain_state, ((l0, logits0), g0) = plain_run
    other = DeepSeekModel(cfg.replace(scan_layers=scan, remat_policy=remat), rngs=nnx.Rngs(3))
    chex.assert_trees_all_equal(plain_state, nnx.state(other))  # same weights
    (l1, logits1), g1 = _loss_and_grad(other, tokens)
    assert_close_scaled(logits1, logits0, rel=1e-5)
    assert float(l1) == pytest.approx(float(l0), rel=1e-6)
    assert_close_scaled(g1, g0, rel=1e-5)


def test_layer_groups_follow_dense_prefix_and_moe_stride():
    assert layer_groups(small_config(num_hidden_layers=5, first_k_dense_replace=2)) == [
        (False, 2), (True, 3)]
    cfg = small_config(num_hidden_layers=5, first_k_dense_replace=1, moe_layer_freq=2)
    assert layer_groups(cfg) == [(False, 2), (True, 1), (False, 1), (True, 1)]
    model = DeepSeekModel(cfg, rngs=nnx.Rngs(0))
    out = model(jnp.ones((1, 4), jnp.int32))
    assert len(out.router) == 2
    dense = DeepSeekModel(small_config(n_routed_experts=None), rngs=nnx.Rngs(0))
    out = dense(jnp.ones((1, 4), jnp.int32))
    assert out.router == () and float(out.aux_loss) == 0.0


def test_mtp_logits_look_exactly_k_plus_one_ahead():
    cfg = small_config(num_nextn_predict_layers=2, first_k_dense_replace=1)
    model = DeepSeekModel(cfg, rngs=nnx.Rngs(1))
    tokens = jax.random.randint(jax.random.key(5), (2, 9), 0, cfg.vocab_size)

    @nnx.jit
    def mtp(model, tokens):
        return model(tokens).mtp_logits

    logits = mtp(model, tokens)
    chex.assert_shape(logits, (2, 2, 9, cfg.vocab_size))
    # Module k at position i sees tokens <= i + k: changing token 6 leaves module 1's
    # positions <= 4 and module 2's positions <= 3 untouched, and changes later ones.
    changed = mtp(model, tokens.at[:, 6].set((tokens[:, 6] + 1) % cfg.vocab_size))
    diff = jnp.abs(changed - logits).max(axis=(1, 3))  # [K, T]
    assert float(diff[0, :5].max()) == 0.0 and float(diff[0, 5:].min()) > 0
    assert float(diff[1, :4].max()) == 0.0 and float(diff[1, 4:].min()) > 0


def test_mtp_loss_is_the_mean_of_shifted_cross_entropies():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 3, 7, 11)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, 11, (3, 7)))
    expected = []
    for k in (1, 2):
        lp = jax.nn.log_softmax(logits[k - 1], axis=-1)
        rows = [-lp[b, i, tokens[b, i + k + 1]] for b in range(3) for i in range(7 - k - 1)]
        expected.append(np.mean(rows))
    assert float(mtp_loss(logits, tokens)) == pytest.approx(np.mean(expected), rel=1e-5)
    seg = jnp.asarray([[0] * 4 + [1] * 3] * 3)
    lp = jax.nn.log_softmax(logits[0], axis=-1)
    rows = [-lp[b, i, tokens[b, i + 2]] for b in range(3) for i in (0, 1, 4)]
    lp2 = jax.nn.log_softmax(logits[1], axis=-1)
    rows2 = [-lp2[b, i, tokens[b, i + 3]] for b in range(3) for i in (0,)]
    got = float(mtp_loss(logits, tokens, segment_ids_BT=seg))
    assert got == pytest.approx((np.mean(rows) + np.mean(rows2)) / 2, rel=1e-5)


def test_bfloat16_compute_keeps_float32_logits_and_master_weights():
    cfg = small_config(dtype="bfloat16", param_dtype="float32")
    model = DeepSeekModel(cfg, rngs=nnx.Rngs(0))
    out = nnx.jit(lambda m, t: m(t))(model, jnp.ones((2, 5), jnp.int32))
    chex.assert_type(out.logits, jnp.float32)
    chex.assert_type(out.hidden, jnp.bfloat16)
    chex.assert_tree_all_finite(out.logits)
    assert model.embed_UD[...].dtype == jnp.float32
    assert model.groups[1].ffn.router.w_DE[...].dtype == jnp.float32


def test_model_rejects_segments_with_a_cache():
    from mla_moe import init_cache

    cfg = small_config()
    model = DeepSeekModel(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="segment_ids_BT"):
        model(jnp.ones((1, 3), jnp.int32), segment_ids_BT=jnp.zeros((1, 3), jnp.int32),
              cache=init_cache(cfg, 1, 8))
    with pytest.raises(ValueError, match="max_length"):
        init_cache(cfg, 1, 10_000)
