"""Language-model losses: next-token cross-entropy and the V3 multi-token-prediction loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(
    logits_BTU: jax.Array, targets_BT: jax.Array, weights_BT: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Returns (sum of weighted token losses, sum of weights), both float32 scalars."""
    logits_BTU = logits_BTU.astype(jnp.float32)
    logz_BT = jax.nn.logsumexp(logits_BTU, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits_BTU, targets_BT[..., None], axis=-1)[..., 0]
    nll_BT = logz_BT - target_logit_BT
    if weights_BT is None:
        weights_BT = jnp.ones_like(nll_BT)
    weights_BT = weights_BT.astype(jnp.float32)
    return jnp.sum(nll_BT * weights_BT), jnp.sum(weights_BT)


def mtp_loss(
    mtp_logits_IBTU: jax.Array,
    tokens_BT: jax.Array,
    segment_ids_BT: jax.Array | None = None,
    weights_BT: jax.Array | None = None,
) -> jax.Array:
    """Mean over the I MTP modules of L^k; module k at position i predicts token i + k + 1.

    Positions whose target lies past the end, in another segment, or has zero weight are
    excluded. Multiply by `config.mtp_loss_weight` (lambda) before adding to the main loss.
    """
    num_i, _, t, _ = mtp_logits_IBTU.shape
    total = jnp.zeros((), jnp.float32)
    for k in range(1, num_i + 1):
        shift = k + 1
        targets_BT = jnp.pad(tokens_BT[:, shift:], ((0, 0), (0, shift)))
        valid_BT = jnp.broadcast_to(jnp.arange(t)[None, :] < t - shift, tokens_BT.shape)
        if segment_ids_BT is not None:
            seg_target = jnp.pad(segment_ids_BT[:, shift:], ((0, 0), (0, shift)),
                                 constant_values=-1)
            valid_BT = valid_BT & (seg_target == segment_ids_BT)
        if weights_BT is not None:
            w_target = jnp.pad(weights_BT[:, shift:], ((0, 0), (0, shift)))
            valid_BT = valid_BT & (w_target > 0)
        loss_sum, count = cross_entropy(mtp_logits_IBTU[k - 1], targets_BT, valid_BT)
        total = total + loss_sum / jnp.maximum(count, 1.0)
    return total / num_i
