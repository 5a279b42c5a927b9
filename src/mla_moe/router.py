"""DeepSeekMoE router: affinity scores and top-k expert selection.

scores s = softmax(z) (V2) or sigmoid(z) (V3), z = u . W_gate, in float32.
- greedy:                top-K of s.
- group_limited_greedy:  keep the `topk_group` groups with the highest max-s, top-K inside.
- noaux_tc:              s~ = s + b (b the aux-loss-free bias, selection only); keep the
                         `topk_group` groups with the highest sum of their top-2 s~, top-K s~.
Gate weights g = s[idx] (never the bias), renormalised if `norm_topk_prob`, then scaled by
`routed_scaling_factor`.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from mla_moe.config import ModelConfig
from mla_moe.layers import param


class ExpertBias(nnx.Variable):
    """`e_score_correction_bias`: non-trainable, moved by `update_expert_bias`."""


@flax.struct.dataclass
class Routing:
    weights_TK: jax.Array  # gate weights g (float32)
    experts_TK: jax.Array  # selected expert ids (int32)
    scores_TE: jax.Array  # affinities s (float32, without the bias)
    logits_TE: jax.Array  # router logits z (float32)


def select_experts(
    scores_TE: jax.Array, bias_E: jax.Array | None, config: ModelConfig
) -> tuple[jax.Array, jax.Array]:
    """Returns (experts_TK int32, gate weights_TK float32)."""
    c = config
    e, k, g = c.n_routed_experts, c.num_experts_per_tok, c.n_group
    choice_TE = scores_TE if bias_E is None else scores_TE + bias_E
    if c.topk_method in ("group_limited_greedy", "noaux_tc") and g > 1:
        grouped_TGe = choice_TE.reshape(-1, g, e // g)
        if c.topk_method == "noaux_tc":
            group_score_TG = jax.lax.top_k(grouped_TGe, 2)[0].sum(-1)
            fill = -jnp.inf
        else:
            group_score_TG = grouped_TGe.max(-1)
            fill = 0.0  # HF's V2 masks with 0; equivalent for softmax scores (all > 0)
        _, top_groups_TJ = jax.lax.top_k(group_score_TG, c.topk_group)
        keep_TG = jnp.zeros_like(group_score_TG, bool).at[
            jnp.arange(group_score_TG.shape[0])[:, None], top_groups_TJ
        ].set(True)
        keep_TE = jnp.repeat(keep_TG, e // g, axis=-1)
        choice_TE = jnp.where(keep_TE, choice_TE, fill)
    _, experts_TK = jax.lax.top_k(choice_TE, k)
    weights_TK = jnp.take_along_axis(scores_TE, experts_TK, axis=-1)
    if c.norm_topk_prob:
        # HF V3 renormalises and then scales; HF's V2 ignores the flag (its published configs
        # all have it off), the V2 remote code renormalises instead of scaling.
        weights_TK = weights_TK / (weights_TK.sum(-1, keepdims=True) + 1e-20)
    return experts_TK.astype(jnp.int32), weights_TK * c.routed_scaling_factor


class Router(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        e = config.n_routed_experts
        # The gate stays float32 whatever the parameter dtype (HF keeps it in fp32 too).
        self.w_DE = param(rngs, (config.hidden_size, e), ("embed", None), dtype="float32",
                          stddev=config.initializer_range)
        if config.topk_method == "noaux_tc":
            self.e_score_correction_bias = ExpertBias(
                jnp.zeros((e,), jnp.float32), out_sharding=(None,), eager_sharding=False
            )
        else:
            self.e_score_correction_bias = None

    def __call__(self, x_TD: jax.Array) -> Routing:
        logits_TE = jnp.einsum(
            "TD,DE->TE", x_TD.astype(jnp.float32), self.w_DE[...].astype(jnp.float32)
        )
        if self.config.scoring_func == "softmax":
            scores_TE = jax.nn.softmax(logits_TE, axis=-1)
        else:
            scores_TE = jax.nn.sigmoid(logits_TE)
        bias = self.e_score_correction_bias
        bias_E = None if bias is None else jax.lax.stop_gradient(bias[...])
        experts_TK, weights_TK = select_experts(scores_TE, bias_E, self.config)
        return Routing(weights_TK, experts_TK, scores_TE, logits_TE)
