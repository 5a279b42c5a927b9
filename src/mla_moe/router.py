"""DeepSeekMoE router: affinity scores, every expert-selection rule, and expert placement.

scores s = softmax(z) (V2) or sigmoid(z) (V3), z = u . W_gate, in float32.
- greedy:                top-K of s.
- group_limited_greedy:  keep the `topk_group` groups with the highest max-s, top-K inside.
- noaux_tc:              s~ = s + b (b the aux-loss-free bias, selection only); keep the
                         `topk_group` groups with the highest sum of their top-2 s~, top-K s~.
- device-limited (V2, `device_limited_routing`): before the group rule, keep per token the
  `device_limit` expert shards with the highest max-s~ over their experts; the shards are
  the real expert placement (`expert_shards`).
Gate weights g = s[idx] (never the bias), renormalised if `norm_topk_prob`, then scaled by
`routed_scaling_factor`.

Placement: expert e lives on shard e // (E/P), P = `expert_shards(config)` contiguous blocks
(the "exp" -> expert sharding rule).
"""

from __future__ import annotations

from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from mla_moe import sharding
from mla_moe.config import ModelConfig
from mla_moe.layers import param


class ExpertBias(nnx.Variable):
    """`e_score_correction_bias`: non-trainable, moved by `update_expert_bias`."""


@flax.struct.dataclass
class Routing:
    """The router's decision for T tokens (all float32 but the ids)."""

    weights_TK: jax.Array  # gate weights g (float32)
    experts_TK: jax.Array  # selected expert ids (int32)
    scores_TE: jax.Array  # affinities s (float32, without the bias)
    logits_TE: jax.Array  # router logits z (float32)

    @property
    def affinity_TK(self) -> jax.Array:
        """s of the chosen experts (without the bias): what ranks assignments for drops."""
        return jnp.take_along_axis(self.scores_TE, self.experts_TK, axis=-1)


# --- placement ---------------------------------------------------------------------------------
def expert_shards(config: ModelConfig) -> int:
    """D: the mesh's expert-parallel degree when > 1, else `config.num_expert_devices`."""
    ep = sharding.mesh_axis_size("expert")
    return ep if ep > 1 else config.num_expert_devices


def placement_config(config: ModelConfig) -> ModelConfig:
    """`config` with expert_devices / device_limit set to the real placement (for the device
    and communication balance losses)."""
    d = expert_shards(config)
    m = min(config.num_device_limit, d)
    if d == config.num_expert_devices and m == config.num_device_limit:
        return config
    return config.replace(expert_devices=d, device_limit=m)


# --- selection ---------------------------------------------------------------------------------
def _keep_top_blocks(choice_TE: jax.Array, blocks: int, keep: int,
                     block_score: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """Bool [T, E]: per token, the experts of the `keep` best of `blocks` contiguous blocks
    (expert groups, or expert shards), a block scored by `block_score` over its experts
    ([T, G, E/G] -> [T, G] with G = blocks)."""
    t, e = choice_TE.shape
    score_TG = block_score(choice_TE.reshape(t, blocks, e // blocks))
    _, top_TJ = jax.lax.top_k(score_TG, keep)
    keep_TG = jnp.zeros(score_TG.shape, bool).at[jnp.arange(t)[:, None], top_TJ].set(True)
    return jnp.repeat(keep_TG, e // blocks, axis=-1)


def _device_limit(config: ModelConfig) -> tuple[int, int] | None:
    """(P shards, shards kept per token) when device-limited routing acts, else None."""
    if not config.device_limited_routing or not config.n_routed_experts:
        return None
    e, d = config.n_routed_experts, expert_shards(config)
    m = min(config.num_device_limit, d)
    if d <= 1 or m >= d:
        return None
    if m * (e // d) < config.num_experts_per_tok:
        raise ValueError(f"device_limit={m} shards of {e // d} experts cannot hold "
                         f"num_experts_per_tok={config.num_experts_per_tok}")
    return d, m


def select_experts(
    scores_TE: jax.Array, bias_E: jax.Array | None, config: ModelConfig
) -> tuple[jax.Array, jax.Array]:
    """Every selection rule of the module docstring. Returns (experts_TK int32, weights_TK
    float32); `bias_E` (noaux_tc) enters the choice only, never the weights."""
    c = config
    k, g = c.num_experts_per_tok, c.n_group
    choice_TE = scores_TE if bias_E is None else scores_TE + bias_E
    limit = _device_limit(c)
    if limit is not None:
        keep_TE = _keep_top_blocks(choice_TE, *limit, lambda x: x.max(-1))
        choice_TE = jnp.where(keep_TE, choice_TE, -jnp.inf)
    if c.topk_method in ("group_limited_greedy", "noaux_tc") and g > 1:
        if c.topk_method == "noaux_tc":
            keep_TE = _keep_top_blocks(choice_TE, g, c.topk_group,
                                       lambda x: jax.lax.top_k(x, 2)[0].sum(-1))
            fill = -jnp.inf
        else:
            keep_TE = _keep_top_blocks(choice_TE, g, c.topk_group, lambda x: x.max(-1))
            fill = 0.0  # HF's V2 masks with 0; equivalent for softmax scores (all > 0)
        choice_TE = jnp.where(keep_TE, choice_TE, fill)
    _, experts_TK = jax.lax.top_k(choice_TE, k)
    weights_TK = jnp.take_along_axis(scores_TE, experts_TK, axis=-1)
    if c.norm_topk_prob:
        # HF V3 renormalises and then scales; HF's V2 ignores the flag (its published configs
        # all have it off), the V2 remote code renormalises instead of scaling.
        weights_TK = weights_TK / (weights_TK.sum(-1, keepdims=True) + 1e-20)
    return experts_TK.astype(jnp.int32), weights_TK * c.routed_scaling_factor


class Router(nnx.Module):
    """Scores T tokens against E experts and selects K of them per token, in float32.

    In: x_TD [T, D] (any float dtype). Out: `Routing` with weights_TK, experts_TK (int32),
    scores_TE, logits_TE. Under a mesh with an `expert` axis, device-limited routing uses that
    placement. Reads: hidden_size, n_routed_experts, num_experts_per_tok, scoring_func,
    topk_method, n_group, topk_group, norm_topk_prob, routed_scaling_factor,
    initializer_range, and device_limited_routing, device_limit, expert_devices.
    Parameters: w_DE [D, E] (float32), and for noaux_tc the `ExpertBias`
    e_score_correction_bias [E].

    Standalone, inside your own nnx module:
        self.router = Router(config, rngs=rngs)                 # in __init__
        routing = self.router(x_BTD.reshape(-1, config.hidden_size))
        top_TK, gate_TK = routing.experts_TK, routing.weights_TK
    """

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
        """Routes x_TD [T, D]: scores, then `select_experts` with the bias (no gradient)."""
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
