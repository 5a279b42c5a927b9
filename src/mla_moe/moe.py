"""DeepSeekMoE layer: shared experts + routed SwiGLU experts, two execution paths.

- dropless: the T*K (token, expert) assignments grouped by expert, one grouped SwiGLU
  (`grouped_swiglu`: ragged_dot on TPU, a blocked scan elsewhere), back, weighted, summed.
  Every assignment is computed.
- capacity: each expert processes at most X = ceil(capacity_factor * T*K / E) assignments
  (T = all tokens of the call); beyond that the lowest-affinity assignments (by router score
  s) are dropped, i.e. contribute nothing for that expert. The shared experts and the residual
  still carry a dropped token. `dropped_fraction` reports the dropped share of assignments.
- under a multi-device mesh (`sharding.use_mesh`), the dropless path runs expert-parallel
  in `jax.shard_map` (moe_parallel.py: dispatch, capacity semantics, placement).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from mla_moe import moe_parallel
from mla_moe.balance import balance_losses
from mla_moe.config import ModelConfig
from mla_moe.grouped_matmul import grouped_swiglu
from mla_moe.layers import SwiGLU, param
from mla_moe.router import Router


def dropless_experts(x_TD, experts_TK, weights_TK, gate_EDF, up_EDF, down_EFD):
    """Routed-expert output [T, D]: every assignment computed (grouped SwiGLU), weighted, summed."""
    y_TD = grouped_swiglu(x_TD, experts_TK, weights_TK, gate_EDF, up_EDF, down_EFD)
    return y_TD, jnp.zeros((), jnp.float32)


def expert_capacity(tokens: int, config: ModelConfig) -> int:
    c = config
    per_expert = c.capacity_factor * tokens * c.num_experts_per_tok / c.n_routed_experts
    return max(1, math.ceil(per_expert))


def capacity_experts(x_TD, experts_TK, weights_TK, scores_TE, capacity, gate_EDF, up_EDF,
                     down_EFD):
    """Routed-expert output [T, D] with at most `capacity` assignments per expert.

    Within each expert, assignments are ranked by router score (highest first, ties by token
    order); those ranked >= capacity are dropped. Returns (y_TD, dropped_fraction).
    """
    t, k = experts_TK.shape
    e = gate_EDF.shape[0]
    flat_M = experts_TK.reshape(-1)
    affinity_M = jnp.take_along_axis(scores_TE, experts_TK, axis=-1).reshape(-1)
    order_M = jnp.lexsort((-affinity_M, flat_M))  # by expert, then by descending affinity
    sorted_e_M = flat_M[order_M]
    group_sizes_E = jnp.bincount(flat_M, length=e)
    starts_E = jnp.cumsum(group_sizes_E) - group_sizes_E
    rank_M = jnp.arange(t * k) - starts_E[sorted_e_M]
    keep_M = rank_M < capacity
    slot_M = jnp.where(keep_M, sorted_e_M * capacity + rank_M, e * capacity)  # last = trash
    buf = jnp.zeros((e * capacity + 1, x_TD.shape[-1]), x_TD.dtype).at[slot_M].set(
        x_TD[order_M // k]
    )
    x_EXD = buf[:-1].reshape(e, capacity, -1)
    h_EXF = jax.nn.silu(
        jnp.einsum("EXD,EDF->EXF", x_EXD, gate_EDF, preferred_element_type=jnp.float32)
    ) * jnp.einsum("EXD,EDF->EXF", x_EXD, up_EDF, preferred_element_type=jnp.float32)
    y_EXD = jnp.einsum("EXF,EFD->EXD", h_EXF.astype(x_TD.dtype), down_EFD,
                       preferred_element_type=jnp.float32)
    y_slots = jnp.concatenate([y_EXD.reshape(e * capacity, -1), jnp.zeros_like(y_EXD[0, :1])])
    y_sorted_MD = y_slots[slot_M]
    y_MD = jnp.zeros_like(y_sorted_MD).at[order_M].set(y_sorted_MD)
    y_TD = jnp.einsum("TKD,TK->TD", y_MD.reshape(t, k, -1), weights_TK.astype(jnp.float32))
    dropped = (t * k - keep_M.sum()).astype(jnp.float32) / (t * k)
    return y_TD, dropped


class MoE(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        c = config
        e, d, f, std, pd = (c.n_routed_experts, c.hidden_size, c.moe_intermediate_size,
                            c.initializer_range, c.param_dtype)
        self.router = Router(c, rngs=rngs)
        self.gate_EDF = param(rngs, (e, d, f), ("exp", "embed", "moe_mlp"), dtype=pd, stddev=std)
        self.up_EDF = param(rngs, (e, d, f), ("exp", "embed", "moe_mlp"), dtype=pd, stddev=std)
        self.down_EFD = param(rngs, (e, f, d), ("exp", "moe_mlp", "embed"), dtype=pd, stddev=std)
        if c.n_shared_experts:
            self.shared = SwiGLU(c.n_shared_experts * f, config=c, rngs=rngs)
        else:
            self.shared = None

    def expert_weights(self, dtype):
        return (self.gate_EDF[...].astype(dtype), self.up_EDF[...].astype(dtype),
                self.down_EFD[...].astype(dtype))

    def __call__(self, x_BTD: jax.Array) -> tuple[jax.Array, dict]:
        """Returns (y [B, T, D], stats) with stats: aux_loss (weighted), losses (dict),
        tokens_per_expert [E], dropped_fraction."""
        c = self.config
        b, t, d = x_BTD.shape
        x_TD = x_BTD.reshape(b * t, d)
        routing = self.router(x_TD)
        bias = self.router.e_score_correction_bias
        limited = moe_parallel.device_limited_select(
            routing.scores_TE, None if bias is None else jax.lax.stop_gradient(bias[...]), c)
        if limited is not None:  # V2 device-limited routing over the real expert placement
            routing = routing.replace(experts_TK=limited[0], weights_TK=limited[1])
        weights = self.expert_weights(x_BTD.dtype)
        if moe_parallel.use_parallel(c):  # a multi-device mesh is active: shard_map path
            affinity_TK = jnp.take_along_axis(routing.scores_TE, routing.experts_TK, axis=-1)
            y_TD, n_dropped = moe_parallel.routed_experts(
                x_TD, routing.experts_TK, routing.weights_TK, affinity_TK, *weights, c)
            dropped = n_dropped / routing.experts_TK.size
        elif c.moe_impl == "dropless":
            y_TD, dropped = dropless_experts(x_TD, routing.experts_TK, routing.weights_TK,
                                             *weights)
        else:
            y_TD, dropped = capacity_experts(
                x_TD, routing.experts_TK, routing.weights_TK, routing.scores_TE,
                expert_capacity(b * t, c), *weights,
            )
        y_BTD = y_TD.astype(x_BTD.dtype).reshape(b, t, d)
        if self.shared is not None:
            y_BTD = y_BTD + self.shared(x_BTD)
        e = c.n_routed_experts
        aux, losses = balance_losses(
            routing.scores_TE.reshape(b, t, e), routing.experts_TK.reshape(b, t, -1),
            routing.logits_TE.reshape(b, t, e), moe_parallel.placement_config(c),
        )
        tokens_per_expert = jnp.bincount(routing.experts_TK.reshape(-1), length=e)
        stats = dict(
            aux_loss=aux,
            losses=losses,
            tokens_per_expert=tokens_per_expert.astype(jnp.float32),
            dropped_fraction=dropped,
        )
        return y_BTD, stats
