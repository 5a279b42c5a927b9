"""The model's attention through pallas_kernels (interpret mode) equals its XLA path."""

import jax
import jax.numpy as jnp
from flax import nnx
from model_configs import small_config
from tolerance import assert_close_scaled

from mla_moe import DeepSeekModel, init_cache
from mla_moe.losses import cross_entropy


def _pair():
    cfg = small_config(num_hidden_layers=2, first_k_dense_replace=1)
    xla = DeepSeekModel(cfg, rngs=nnx.Rngs(0))
    kern = DeepSeekModel(cfg.replace(attention_impl="interpret"), rngs=nnx.Rngs(0))
    return cfg, xla, kern


def test_training_path_forward_and_grads_match():
    cfg, xla, kern = _pair()
    tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, cfg.vocab_size)
    seg = jnp.array([[0] * 4 + [1] * 6, [0] * 10])

    @nnx.jit
    def loss_grad(model):
        def loss(model):
            out = model(tokens, segment_ids_BT=seg)
            s, n = cross_entropy(out.logits[:, :-1], tokens[:, 1:])
            return s / n, out.logits
        return nnx.value_and_grad(loss, has_aux=True)(model)

    (l_x, logits_x), g_x = loss_grad(xla)
    (l_k, logits_k), g_k = loss_grad(kern)
    assert_close_scaled(logits_k, logits_x, rel=1e-5)
    assert_close_scaled(g_k, g_x, rel=1e-5)


def test_absorbed_decode_through_the_latent_kernel_matches():
    cfg, xla, kern = _pair()
    tokens = jax.random.randint(jax.random.key(2), (2, 7), 0, cfg.vocab_size)

    @nnx.jit
    def decode(model, tokens):
        cache = init_cache(cfg, 2, 16)
        cache = cache.replace(lengths_B=jnp.array([0, 0]))
        out = model(tokens[:, :5], cache=cache, attention_form="absorbed")
        rows = [out.logits]
        cache = out.cache.replace(lengths_B=jnp.array([5, 3]))  # ragged: row 1 rolls back
        for t in (5, 6):
            out = model(tokens[:, t:t + 1], cache=cache, attention_form="absorbed")
            rows.append(out.logits)
            cache = out.cache
        return jnp.concatenate(rows, axis=1)

    assert_close_scaled(decode(kern, tokens), decode(xla, tokens), rel=1e-5)
