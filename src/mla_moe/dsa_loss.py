"""The V3.2 indexer's training loss: KL from the main attention to the indexer's scores.

DeepSeek-V3.2-Exp trains the lightning indexer (indexer.py) to predict where the main MLA
attends: for query t the target p[t, :] is the main attention's probabilities summed over its
heads and L1-normalised over the keys, detached; the loss is KL(p[t, :] || softmax(I[t, :]))
over the keys the attention saw (every causal key in the dense warm-up, the selected top-k in
sparse training), averaged over the tokens (and, in the decoder, over the layers).

These are the dense forms, [B, T, S] at once, for sequences of a few thousand tokens and the
tests' reference.

Legend: see layers.py; as in indexer.py, n the indexer heads and d the indexer head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mla_moe.indexer import index_scores


def attention_target(q_latent_BTNC: jax.Array, q_pe_BTNR: jax.Array, kv_BSL: jax.Array,
                     mask_BTS: jax.Array, sm_scale: float) -> jax.Array:
    """p [B, T, S] float32: the absorbed MLA's softmax over the keys `mask_BTS` allows, summed
    over the N heads and divided by N (each head's row sums to 1), so each row with a key sums
    to 1. The same probabilities as the attention's own (absorbed and naive forms agree)."""
    q_BTNL = jnp.concatenate([q_latent_BTNC, q_pe_BTNR.astype(q_latent_BTNC.dtype)], axis=-1)
    scores_BTNS = jnp.einsum("BTNL,BSL->BTNS", q_BTNL, kv_BSL.astype(q_BTNL.dtype),
                             preferred_element_type=jnp.float32) * sm_scale
    m_BT1S = mask_BTS[:, :, None, :]
    probs_BTNS = jnp.where(m_BT1S, jax.nn.softmax(jnp.where(m_BT1S, scores_BTNS, -jnp.inf),
                                                  axis=-1), 0.0)
    return jax.lax.stop_gradient(jnp.mean(jnp.nan_to_num(probs_BTNS), axis=2))


def kl_to_scores(target_BTS: jax.Array, scores_BTS: jax.Array, mask_BTS: jax.Array
                 ) -> jax.Array:
    """KL(target || softmax(scores)) per row [B, T] over the masked-in keys (0 for a row with
    none). target rows sum to 1 over the mask; 0 log 0 is 0."""
    log_q_BTS = jax.nn.log_softmax(jnp.where(mask_BTS, scores_BTS, -jnp.inf), axis=-1)
    p_BTS = jnp.where(mask_BTS, target_BTS, 0.0)
    terms_BTS = jnp.where(p_BTS > 0, p_BTS * (jnp.log(jnp.where(p_BTS > 0, p_BTS, 1.0))
                                              - jnp.where(mask_BTS, log_q_BTS, 0.0)), 0.0)
    return jnp.sum(terms_BTS, axis=-1)


def indexer_kl(q_BTnd: jax.Array, w_BTn: jax.Array, k_BSd: jax.Array, target_BTS: jax.Array,
               mask_BTS: jax.Array) -> jax.Array:
    """The loss of one layer: the mean over tokens of KL(target || softmax(I)) with
    I = index_scores(q, w, k), over the keys of `mask_BTS`. Gradients reach q, w and k only."""
    scores_BTS = index_scores(q_BTnd, w_BTn, k_BSd)
    return jnp.mean(kl_to_scores(jax.lax.stop_gradient(target_BTS), scores_BTS, mask_BTS))
