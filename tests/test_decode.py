"""Cached decoding: absorbed vs naive MLA step by step, prefill + decode vs the full forward,
chunked prefill, and `generate` against a no-cache greedy reference.

`tiny_model` is shared with the speculative / FP8 tests (one small MoE + MTP config).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tolerance import assert_close_scaled

import mla_moe
from mla_moe.generation import decode_step, pad_prompts, prefill, prompt_bucket

TINY = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=24,
    num_hidden_layers=1, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32,
    qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
    num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=0,
    max_position_embeddings=512, num_nextn_predict_layers=1,
    # Wide weights: peaked logits (no near-ties for greedy) and non-uniform routing.
    initializer_range=0.15,
    rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=64,
                      mscale=0.707, mscale_all_dim=0.707),
)

PROMPTS = [[5, 17, 99, 3, 42, 8, 61], [7, 120, 33], list(range(20, 31))]


@functools.cache
def tiny_model(seed: int = 0, **overrides) -> mla_moe.DeepSeekModel:
    config = mla_moe.ModelConfig(**{**TINY, **overrides})
    return mla_moe.DeepSeekModel(config, rngs=nnx.Rngs(seed))


REF_LEN, REF_BATCH = 32, 3  # the no-cache reference runs at one padded shape: one compile


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _full_forward(graphdef, state, tokens_BT):
    out = nnx.merge(graphdef, state)(tokens_BT)
    return out.logits, out.hidden, out.mtp_logits


def full_forward(model, seqs):
    """No-cache forward of right-padded sequences: (logits, hidden, mtp_logits), [3, 32, ...].
    Causal attention makes the outputs at real positions independent of the padding."""
    tokens = np.zeros((REF_BATCH, REF_LEN), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = s
    return _full_forward(*nnx.split(model), jnp.asarray(tokens))


def reference_greedy(model, prompts, n):
    """Greedy continuation by re-running the full (no-cache) forward pass each step."""
    seqs = [list(p) for p in prompts]
    for _ in range(n):
        logits_BTU = full_forward(model, seqs)[0]
        for b, s in enumerate(seqs):
            s.append(int(jnp.argmax(logits_BTU[b, len(s) - 1])))
    return [s[len(p):] for s, p in zip(seqs, prompts)]


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


def test_absorbed_equals_naive_and_full_forward_every_step():
    model = tiny_model()
    graphdef, state = nnx.split(model)
    tokens_BT, lengths_B = pad_prompts(PROMPTS, model.config.vocab_size, prompt_bucket(11))
    cache = mla_moe.init_cache(model.config, len(PROMPTS), 64)
    h_last_BD, _, cache = prefill(model, tokens_BT, lengths_B, cache)
    logits_BU = model.logits(h_last_BD[:, None])[:, 0]
    seqs = [list(p) for p in PROMPTS]
    step_logits = [logits_BU]
    for _ in range(6):
        tok_B = jnp.argmax(logits_BU, -1).astype(jnp.int32)
        for s, t in zip(seqs, tok_B.tolist()):
            s.append(t)
        naive_BTU, _, _ = decode_step(graphdef, state, tok_B[:, None], _copy(cache), "naive")
        logits_BTU, _, cache = decode_step(graphdef, state, tok_B[:, None], cache, "absorbed")
        assert_close_scaled(logits_BTU, naive_BTU, rel=1e-5)
        logits_BU = logits_BTU[:, 0]
        step_logits.append(logits_BU)
    np.testing.assert_array_equal(cache.lengths_B, lengths_B + 6)
    # The logits of every cached step equal the full forward pass over the whole sequence.
    full_BTU = full_forward(model, seqs)[0]
    for b, seq in enumerate(seqs):
        n = len(PROMPTS[b])
        cached_TU = jnp.stack([lg[b] for lg in step_logits])
        assert_close_scaled(cached_TU, full_BTU[b, n - 1 : len(seq)], rel=1e-5)
    assert float(jnp.abs(full_BTU).max()) > 1.0  # the comparison is not of near-zeros


def test_chunked_prefill_matches_single_chunk():
    model = tiny_model()
    prompts = [list(range(1, 40)), [9, 8, 7]]
    outs = []
    for chunk, bucket in ((64, 64), (16, 48)):
        tokens_BT, lengths_B = pad_prompts(prompts, model.config.vocab_size, bucket)
        cache = mla_moe.init_cache(model.config, 2, 64)
        outs.append(prefill(model, tokens_BT, lengths_B, cache, chunk=chunk))
    (h1, hid1, c1), (h2, hid2, c2) = outs
    assert_close_scaled(h1, h2, rel=1e-5)
    assert_close_scaled(hid1[:, :39], hid2[:, :39], rel=1e-5)
    for a, b in zip(c1.latents, c2.latents):  # the valid slots of each row agree
        assert_close_scaled(a[:, 0, :39], b[:, 0, :39], rel=1e-5)
        assert_close_scaled(a[:, 1, :3], b[:, 1, :3], rel=1e-5)
    assert prompt_bucket(39, 16) == 48 and prompt_bucket(5, 512) == 16


@pytest.mark.parametrize("form", ["absorbed", "naive"])
def test_generate_matches_reference_greedy(form):
    model = tiny_model()
    got = mla_moe.generate(model, PROMPTS, max_new_tokens=10, decode_form=form)
    want = reference_greedy(model, PROMPTS, 10)
    assert got == want
    assert all(len(set(row)) >= 3 for row in want)  # not a degenerate repetition


def test_generate_no_recompile_within_bucket_and_eos():
    from mla_moe.generation import _decode_loop, _prefill_chunk

    model = tiny_model()
    first = mla_moe.generate(model, PROMPTS, max_new_tokens=10)
    sizes = (_prefill_chunk._cache_size(), _decode_loop._cache_size())
    # Other prompt lengths in the same bucket (<= 16) reuse both executables.
    other = [[1, 2], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [100]]
    mla_moe.generate(model, other, max_new_tokens=10)
    assert (_prefill_chunk._cache_size(), _decode_loop._cache_size()) == sizes
    # EOS: each row stops right after its first EOS (kept), other rows go on.
    eos = first[0][3]
    stopped = mla_moe.generate(model, PROMPTS, max_new_tokens=10, eos_id=eos)
    for full, cut in zip(first, stopped):
        want = full[: full.index(eos) + 1] if eos in full else full
        assert cut == want
    assert len(stopped[0]) == first[0].index(eos) + 1 < 10


def test_generate_rejects_bad_prompts():
    model = tiny_model()
    with pytest.raises(ValueError, match="empty"):
        mla_moe.generate(model, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="outside"):
        mla_moe.generate(model, [[1, 128]], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        mla_moe.generate(model, [[1]], max_new_tokens=600)


def test_unstacked_model_equals_stacked():
    """`unstacked()` (what generate runs) computes the same forward and cached step, and
    leaves the stacked model untouched."""
    model = tiny_model(num_hidden_layers=3, first_k_dense_replace=1)
    flat = model.unstacked()
    assert all(isinstance(g, nnx.List) for g in flat.groups)
    assert [len(g) for g in flat.groups] == [1, 2]
    tokens = jnp.asarray([[5, 17, 99, 3], [7, 120, 33, 1]], jnp.int32)
    a, b = model(tokens), flat(tokens)
    assert_close_scaled(a.logits, b.logits, rel=1e-6)
    assert_close_scaled(a.mtp_logits, b.mtp_logits, rel=1e-6)
    cache = mla_moe.init_cache(model.config, 2, 16)
    sa = model(tokens, cache=cache, attention_form="absorbed")
    sb = flat(tokens, cache=cache, attention_form="absorbed")
    assert_close_scaled(sa.logits, sb.logits, rel=1e-6)
    for x, y in zip(sa.cache.latents, sb.cache.latents, strict=True):
        np.testing.assert_array_equal(x, y)
    assert model.groups[1].attn.wkv_a_DL.shape[0] == 2  # still stacked


def test_absorbed_decode_step_updates_the_cache_in_place():
    """The compiled decode step writes each layer's donated cache in place: its temporaries
    are well under one layer's cache (a copy of the cache would not fit in them), and the
    whole cache is aliased from input to output. This pins the write's ordering after the
    attention's read of the cache (`cache.write_entries(after=...)`)."""
    model = tiny_model(max_position_embeddings=4096)
    graphdef, state = nnx.split(model.unstacked())
    b, s = 4, 4096
    cache = jax.eval_shape(lambda: mla_moe.init_cache(model.config, b, s))
    tokens_BT = jax.ShapeDtypeStruct((b, 1), jnp.int32)
    compiled = decode_step.lower(graphdef, state, tokens_BT, cache, form="absorbed").compile()
    memory = compiled.memory_analysis()
    layer_bytes = cache.latents[0].size * cache.latents[0].dtype.itemsize
    assert memory.temp_size_in_bytes < layer_bytes / 2, (memory.temp_size_in_bytes, layer_bytes)
    assert memory.alias_size_in_bytes >= layer_bytes * len(cache.latents)
