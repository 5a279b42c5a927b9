"""Sampling: greedy, temperature, top-k and top-p filtering, seeded reproducibility."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_decode import PROMPTS, tiny_model

import mla_moe
from mla_moe.sampling import GREEDY, Sampling, filter_logits, sample


def test_filters_keep_the_right_sets():
    logits = jnp.log(jnp.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    kept = lambda s: np.isfinite(np.asarray(filter_logits(logits, s)))[0].tolist()  # noqa: E731
    assert kept(Sampling(top_k=2)) == [True, True, False, False, False]
    # top-p keeps the smallest prefix whose mass reaches p (0.5 + 0.2 >= 0.6).
    assert kept(Sampling(top_p=0.6)) == [True, True, False, False, False]
    assert kept(Sampling(top_p=0.5)) == [True, False, False, False, False]
    assert kept(Sampling(top_p=0.86)) == [True, True, True, True, False]
    assert all(kept(Sampling()))
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0.0)


def test_sample_distribution_and_greedy():
    logits = jnp.tile(jnp.log(jnp.array([[0.5, 0.2, 0.15, 0.1, 0.05]])), (4000, 1))
    key = jax.random.key(0)
    assert bool(jnp.all(sample(logits, key, None) == 0))
    assert bool(jnp.all(sample(logits, key, GREEDY) == 0))
    freq = np.bincount(np.asarray(sample(logits, key, Sampling(top_k=3))), minlength=5) / 4000
    np.testing.assert_allclose(freq, [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0], atol=0.03)
    # Temperature 0.5 squares the probabilities (renormalised).
    freq = np.bincount(np.asarray(sample(logits, key, Sampling(temperature=0.5))),
                       minlength=5) / 4000
    p2 = np.array([0.5, 0.2, 0.15, 0.1, 0.05]) ** 2
    np.testing.assert_allclose(freq, p2 / p2.sum(), atol=0.03)


def test_generate_sampling_is_seeded():
    model = tiny_model()
    s = Sampling(temperature=1.0, top_k=20, top_p=0.95)
    a = mla_moe.generate(model, PROMPTS, max_new_tokens=10, sampling=s, seed=3)
    b = mla_moe.generate(model, PROMPTS, max_new_tokens=10, sampling=s, seed=3)
    c = mla_moe.generate(model, PROMPTS, max_new_tokens=10, sampling=s, seed=4)
    greedy = mla_moe.generate(model, PROMPTS, max_new_tokens=10)
    assert a == b
    assert a != c and a != greedy
    assert all(len(row) == 10 for row in a + c)
