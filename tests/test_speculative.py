"""MTP speculative decoding: the output equals plain greedy decoding whatever the drafts, and
the MTP module's latent cache reproduces its full-sequence (training-time) logits."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_decode import PROMPTS, full_forward, tiny_model
from tolerance import assert_close_scaled

import mla_moe
from mla_moe.speculative import _mtp_logits, speculative_generate

MAX_NEW = 12


@functools.partial(jax.jit, static_argnames=("graphdef", "form"))
def _mtp_step(graphdef, state, h_BTD, next_BT, mcache, form):
    return _mtp_logits(nnx.merge(graphdef, state), h_BTD, next_BT, mcache, form)


def test_speculative_with_mtp_drafts_equals_greedy():
    model = tiny_model()
    want = mla_moe.generate(model, PROMPTS, max_new_tokens=MAX_NEW)
    got, stats = speculative_generate(model, PROMPTS, max_new_tokens=MAX_NEW)
    assert got == want
    # Every row runs one verification per step and commits 1 + accepted tokens per step.
    assert np.all(stats.drafted >= 1) and np.all(stats.accepted <= stats.drafted)
    assert np.all(1 + stats.drafted + stats.accepted >= MAX_NEW)
    assert 0.0 <= stats.acceptance_rate <= 1.0
    print(f"MTP acceptance rate (random weights): {stats.acceptance_rate:.3f}")


def test_speculative_accept_and_reject_paths_equal_greedy():
    """Drafts taken from the greedy answer, wrong on purpose every third token: rows accept
    and reject at different steps, and the output still equals greedy."""
    model = tiny_model()
    want = mla_moe.generate(model, PROMPTS, max_new_tokens=MAX_NEW)
    ref_BT = jnp.asarray(np.array([row + [0, 0, 0] for row in want], np.int32))
    rows = jnp.arange(len(PROMPTS))
    vocab = model.config.vocab_size

    def draft_fn(draft_B, count_B):
        del draft_B
        right_B = ref_BT[rows, jnp.clip(count_B, 0, ref_BT.shape[1] - 1)]
        return jnp.where(count_B % 3 == 0, (right_B + 1) % vocab, right_B)

    got, stats = speculative_generate(model, PROMPTS, max_new_tokens=MAX_NEW, draft_fn=draft_fn)
    assert got == want
    assert stats.accepted.sum() > 0 and np.all(stats.accepted < stats.drafted)
    assert stats.drafted.max() < MAX_NEW - 1  # fewer main-model calls than plain decoding
    # With EOS the speculative rows stop exactly where greedy rows stop.
    eos = want[1][4]
    want_eos = mla_moe.generate(model, PROMPTS, max_new_tokens=MAX_NEW, eos_id=eos)
    got_eos, _ = speculative_generate(model, PROMPTS, max_new_tokens=MAX_NEW, eos_id=eos)
    assert got_eos == want_eos and len(got_eos[1]) == want[1].index(eos) + 1 < MAX_NEW


def test_mtp_cache_matches_full_forward():
    model = tiny_model()
    graphdef, state = nnx.split(model)
    seq = [3, 77, 12, 9, 101, 45, 45, 2, 66, 19]
    n, first = len(seq), 6
    _, full_hidden, full_mtp = full_forward(model, [seq])
    mtp_full_TU = full_mtp[0, 0]  # position i predicts token i + 2
    hidden_BTD = full_hidden[:1, :n]  # cached prefill hidden == this (test_decode.py)
    mcache = mla_moe.init_cache(model.config, 1, 32, mtp=True)
    nxt = jnp.asarray([seq[1:] + [0]])
    logits, mcache = _mtp_step(graphdef, state, hidden_BTD[:, :first], nxt[:, :first], mcache,
                               "naive")
    pieces = [logits[0]]
    for i in range(first, n - 1):  # then one position at a time, absorbed
        logits, mcache = _mtp_step(graphdef, state, hidden_BTD[:, i : i + 1],
                                   nxt[:, i : i + 1], mcache, "absorbed")
        pieces.append(logits[0])
    np.testing.assert_array_equal(mcache.lengths_B, [n - 1])
    assert_close_scaled(jnp.concatenate(pieces), mtp_full_TU[: n - 1], rel=5e-6)


def test_speculative_needs_mtp():
    model = tiny_model(num_nextn_predict_layers=0)
    with pytest.raises(ValueError, match="MTP"):
        speculative_generate(model, PROMPTS, max_new_tokens=4)
