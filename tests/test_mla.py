"""MLA: rope/YaRN numbers, absorbed vs naive, cache decoding, causality, segment isolation."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_configs import small_config
from tolerance import assert_close_scaled

from mla_moe import DeepSeekModel, init_cache
from mla_moe.mla import MLA
from mla_moe.rope import apply_rope, rope_frequencies, softmax_scale

V3_YARN = dict(type="yarn", factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0,
               beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)


@pytest.mark.parametrize("mscale_all_dim, tau", [(None, 0.0721688), (0.707, 0.1147214),
                                                 (1.0, 0.1352338)])
def test_softmax_scale_matches_the_spec_table(mscale_all_dim, tau):
    rs = None if mscale_all_dim is None else dict(V3_YARN, mscale=mscale_all_dim,
                                                  mscale_all_dim=mscale_all_dim)
    cfg = small_config(qk_nope_head_dim=128, qk_rope_head_dim=64, rope_scaling=rs)
    assert softmax_scale(cfg) == pytest.approx(tau, abs=1e-7)


def test_yarn_ramp_bounds_from_the_spec():
    cfg = small_config(qk_nope_head_dim=128, qk_rope_head_dim=64, rope_scaling=dict(V3_YARN))
    inv_freq, attention_factor = rope_frequencies(cfg)
    base = 1.0 / 10000.0 ** (np.arange(0, 64, 2) / 64)
    # i <= 10 keeps the original frequency, i >= 23 is divided by the factor 40.
    np.testing.assert_allclose(inv_freq[:11], base[:11], rtol=1e-6)
    np.testing.assert_allclose(inv_freq[23:], base[23:] / 40.0, rtol=1e-6)
    assert np.all((inv_freq[11:23] < base[11:23]) & (inv_freq[11:23] > base[11:23] / 40))
    assert attention_factor == 1.0  # mscale == mscale_all_dim


def test_interleaved_and_half_split_rope_give_the_same_scores():
    """The two layouts are permutations of each other: q.k is identical."""
    key = jax.random.key(0)
    q, k = jax.random.normal(key, (2, 5, 3, 8)), jax.random.normal(jax.random.key(1), (2, 5, 8))
    pos = jnp.broadcast_to(jnp.arange(5) * 7, (2, 5))
    perm = np.concatenate([np.arange(0, 8, 2), np.arange(1, 8, 2)])  # interleaved -> halves
    scores = {}
    for interleave in (True, False):
        cfg = small_config(qk_rope_head_dim=8, rope_interleave=interleave)
        qq, kk = (q, k) if interleave else (q[..., perm], k[..., perm])
        scores[interleave] = jnp.einsum("BTNR,BSR->BNTS", apply_rope(qq, pos, cfg),
                                        apply_rope(kk, pos, cfg))
    assert_close_scaled(scores[True], scores[False], rel=1e-6)


@pytest.mark.parametrize("q_lora_rank", [None, 24])
def test_absorbed_equals_naive_forward_and_grad(q_lora_rank):
    cfg = small_config(q_lora_rank=q_lora_rank)
    mla = MLA(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 9, cfg.hidden_size))
    pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
    seg = jnp.array([[0] * 4 + [1] * 5, [0] * 9])

    def run(mla, x, form):
        return mla(x, pos, seg, form=form)[0]

    naive, absorbed = run(mla, x, "naive"), run(mla, x, "absorbed")
    grad = nnx.jit(nnx.grad(lambda mla, x, form: jnp.sum(jnp.sin(run(mla, x, form))),
                            argnums=(0, 1)), static_argnames="form")
    chex.assert_shape(naive, (2, 9, cfg.hidden_size))
    assert_close_scaled(absorbed, naive, rel=5e-6)

    g_naive, g_abs = grad(mla, x, form="naive"), grad(mla, x, form="absorbed")
    assert_close_scaled(g_abs, g_naive, rel=5e-6)


@pytest.fixture(scope="module")
def model_and_tokens():
    cfg = small_config()
    model = DeepSeekModel(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, cfg.vocab_size)
    return model, tokens


@nnx.jit(static_argnames="form")
def _forward(model, tokens, cache=None, form=None):
    out = model(tokens, cache=cache, attention_form=form)
    return out.logits, out.cache


@pytest.mark.parametrize("form", ["naive", "absorbed"])
def test_incremental_decoding_matches_full_forward(model_and_tokens, form):
    model, tokens = model_and_tokens
    full, _ = _forward(model, tokens)
    cache = init_cache(model.config, 2, 16)
    assert cache.bytes_per_token_per_layer() == (16 + 4) * 4  # latent + rope key only
    logits, cache = _forward(model, tokens[:, :5], cache, form)  # prefill 5
    steps = [logits]
    for t in range(5, 12):  # then one token at a time
        logits, cache = _forward(model, tokens[:, t:t + 1], cache, form)
        steps.append(logits)
    assert_close_scaled(jnp.concatenate(steps, axis=1), full, rel=1e-5)
    np.testing.assert_array_equal(cache.lengths_B, [12, 12])


def test_ragged_cache_rows_decode_independently(model_and_tokens):
    """Row 1 rolls its length back (as after right-padded prefill): later tokens still match
    a clean run of that row alone."""
    model, tokens = model_and_tokens
    cache = init_cache(model.config, 2, 16)
    _, cache = _forward(model, tokens[:, :6], cache, "absorbed")
    cache = cache.replace(lengths_B=jnp.array([6, 3]))
    nxt = jnp.stack([tokens[0, 6:8], tokens[1, 3:5]])
    logits, _ = _forward(model, nxt, cache, "absorbed")
    alone, _ = _forward(model, tokens[1:2, :5])
    assert_close_scaled(logits[1], alone[0, 3:5], rel=1e-5)
    full0, _ = _forward(model, tokens[0:1, :8])
    assert_close_scaled(logits[0], full0[0, 6:8], rel=1e-5)


def test_causality_by_gradients(model_and_tokens):
    """d logits[t] / d input embedding[t'] is zero for every t' > t, non-zero for t' <= t."""
    model, tokens = model_and_tokens
    emb = model.embed(tokens)

    @nnx.jit
    def influence(model, emb):
        def grad_at(i):  # d logits[:, i] / d emb: [B, T', D]
            return jax.grad(lambda e: model(tokens, inputs_embeds_BTD=e).logits[:, i].sum())(emb)
        # lax.map, not vmap: ragged_dot has no batching rule over these dims.
        return jnp.abs(jax.lax.map(grad_at, jnp.arange(emb.shape[1]))).max(-1)  # [T, B, T']

    t = tokens.shape[1]
    influence = influence(model, emb).transpose(1, 0, 2)  # [B, T, T']
    later = jnp.triu(jnp.ones((t, t), bool), k=1)
    assert float(jnp.where(later, influence, 0).max()) == 0.0
    assert float(jnp.where(later, jnp.inf, influence).min()) > 0.0


def test_segments_are_isolated(model_and_tokens):
    """Packed documents: changing document 1 leaves document 0's logits unchanged and
    document 1 equals a standalone run (rope positions restarting at 0)."""
    model, tokens = model_and_tokens
    seg = jnp.array([[0] * 5 + [1] * 7] * 2)
    pos = jnp.array([list(range(5)) + list(range(7))] * 2)
    other = tokens.at[:, 5:].set((tokens[:, 5:] + 3) % model.config.vocab_size)

    @nnx.jit
    def packed(model, tok):
        return model(tok, positions_BT=pos, segment_ids_BT=seg).logits

    a, b = packed(model, tokens), packed(model, other)
    assert_close_scaled(a[:, :5], b[:, :5], rel=1e-6)
    assert float(jnp.abs(a[:, 5:] - b[:, 5:]).max()) > 1e-3
    alone, _ = _forward(model, tokens[:, 5:])
    assert_close_scaled(a[:, 5:], alone, rel=1e-5)


def test_positions_default_to_arange_and_continue_the_cache():
    cfg = small_config()
    mla = MLA(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 5, cfg.hidden_size))
    explicit, _ = mla(x, jnp.broadcast_to(jnp.arange(5), (2, 5)))
    np.testing.assert_array_equal(mla(x)[0], explicit)
    cache_BSL = jnp.zeros((2, 16, cfg.kv_lora_rank + cfg.qk_rope_head_dim))
    lengths_B = jnp.array([3, 7])
    pos_BT = lengths_B[:, None] + jnp.arange(5)[None, :]
    want, want_cache = mla(x, pos_BT, cache_BSW=cache_BSL, lengths_B=lengths_B)
    got, got_cache = mla(x, cache_BSW=cache_BSL, lengths_B=lengths_B)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_cache, want_cache)


def test_cache_write_is_one_scatter_whatever_the_batch():
    """The T new entries of every row go in with one op: the traced step does not grow with
    the batch, and each row's entries land at its own length."""
    from mla_moe.cache import write_entries

    def eqns(b):
        cache_BSW, new_BTW = jnp.zeros((b, 16, 3)), jnp.ones((b, 2, 3))
        jaxpr = jax.make_jaxpr(write_entries)(cache_BSW, new_BTW, jnp.zeros((b,), jnp.int32))
        return [e.primitive.name for e in jaxpr.eqns]

    assert eqns(1) == eqns(8)
    assert eqns(8).count("scatter") == 1
    cache_BSW = write_entries(jnp.zeros((2, 6, 1)), jnp.ones((2, 2, 1)), jnp.array([1, 3]))
    np.testing.assert_array_equal(cache_BSW[..., 0], [[0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 0]])
