"""DeepSeekMoE layer: shared experts + routed SwiGLU experts, two execution paths.

The `Router` (router.py) picks each token's experts once; this layer only computes them.
- dropless: the T*K (token, expert) assignments grouped by expert, one grouped SwiGLU
  (`grouped_swiglu`: ragged_dot on TPU, a blocked scan elsewhere), back, weighted, summed.
  Every assignment is computed.
- capacity: each expert processes at most X = ceil(capacity_factor * T*K / E) assignments
  (T = all tokens of the call); beyond that the lowest-affinity assignments (by router score
  s) are dropped, i.e. contribute nothing for that expert. The shared experts and the residual
  still carry a dropped token. `dropped_fraction` reports the dropped share of assignments.
- under a multi-device mesh (`sharding.use_mesh`), the dropless path runs expert-parallel
  in `jax.shard_map` (moe_parallel.py: the token exchange and its capacity semantics).
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from mla_moe import moe_parallel
from mla_moe.balance import balance_losses
from mla_moe.config import ModelConfig
from mla_moe.grouped_matmul import capacity_slots, grouped_swiglu
from mla_moe.layers import SwiGLU, param
from mla_moe.router import Router, placement_config


@flax.struct.dataclass
class MoEStats:
    """What one MoE layer reports besides its output (a pytree; stacked by `lax.scan`)."""

    aux_loss: jax.Array  # scalar: the balance / z losses, weighted by their coefficients
    losses: dict[str, jax.Array]  # unweighted, by name (the losses with a non-zero weight)
    tokens_per_expert: jax.Array  # [E] float32, global over every data shard
    dropped_fraction: jax.Array  # scalar: share of the T*K assignments dropped


@flax.struct.dataclass
class MoEOutput:
    """`MoE.__call__`'s result: the routed + shared experts' output and its statistics."""

    y_BTD: jax.Array  # [B, T, D] in the input dtype
    stats: MoEStats


def dropless_experts(x_TD: jax.Array, experts_TK: jax.Array, weights_TK: jax.Array,
                     gate_EDF: jax.Array, up_EDF: jax.Array, down_EFD: jax.Array
                     ) -> tuple[jax.Array, jax.Array]:
    """(y_TD float32, dropped_fraction 0): every assignment computed (grouped SwiGLU),
    weighted, summed."""
    y_TD = grouped_swiglu(x_TD, experts_TK, weights_TK, gate_EDF, up_EDF, down_EFD)
    return y_TD, jnp.zeros((), jnp.float32)


def expert_capacity(tokens: int, config: ModelConfig) -> int:
    """X = ceil(capacity_factor * tokens * K / E), at least 1."""
    c = config
    per_expert = c.capacity_factor * tokens * c.num_experts_per_tok / c.n_routed_experts
    return max(1, math.ceil(per_expert))


def capacity_experts(x_TD: jax.Array, experts_TK: jax.Array, weights_TK: jax.Array,
                     affinity_TK: jax.Array, capacity: int, gate_EDF: jax.Array,
                     up_EDF: jax.Array, down_EFD: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(y_TD float32, dropped_fraction) with at most `capacity` assignments per expert.

    Within each expert, assignments are ranked by router score `affinity_TK` (highest first,
    ties by token order); those ranked >= capacity are dropped (`capacity_slots`).
    """
    t, k = experts_TK.shape
    e = gate_EDF.shape[0]
    slot_M = capacity_slots(experts_TK.reshape(-1), affinity_TK.reshape(-1), e, capacity)
    buf = jnp.zeros((e * capacity + 1, x_TD.shape[-1]), x_TD.dtype).at[slot_M].set(
        x_TD[jnp.arange(t * k) // k]
    )  # the last row catches the dropped assignments
    x_EXD = buf[:-1].reshape(e, capacity, -1)
    h_EXF = jax.nn.silu(
        jnp.einsum("EXD,EDF->EXF", x_EXD, gate_EDF, preferred_element_type=jnp.float32)
    ) * jnp.einsum("EXD,EDF->EXF", x_EXD, up_EDF, preferred_element_type=jnp.float32)
    y_EXD = jnp.einsum("EXF,EFD->EXD", h_EXF.astype(x_TD.dtype), down_EFD,
                       preferred_element_type=jnp.float32)
    y_slots = jnp.concatenate([y_EXD.reshape(e * capacity, -1), jnp.zeros_like(y_EXD[0, :1])])
    y_MD = y_slots[slot_M]
    y_TD = jnp.einsum("TKD,TK->TD", y_MD.reshape(t, k, -1), weights_TK.astype(jnp.float32))
    dropped = (slot_M == e * capacity).sum().astype(jnp.float32) / (t * k)
    return y_TD, dropped


class MoE(nnx.Module):
    """DeepSeekMoE feed-forward: a `Router`, E routed SwiGLU experts and the shared experts.

    In: x_BTD [B, T, D]. Out: `MoEOutput` with y_BTD [B, T, D] (the input dtype) and `MoEStats`
    (aux_loss, losses, tokens_per_expert [E], dropped_fraction). Reads: hidden_size,
    moe_intermediate_size, n_routed_experts, n_shared_experts, param_dtype, initializer_range,
    moe_impl, capacity_factor, moe_dispatch, dispatch_capacity_factor, the balance
    coefficients (aux_loss_alpha, device_balance_alpha, comm_balance_alpha, seq_balance_alpha,
    router_z_loss_coef, seq_aux) and every field the `Router` reads.

    Standalone, inside your own nnx module:
        self.moe = MoE(config, rngs=rngs)                        # in __init__
        out = self.moe(x_BTD)
        y_BTD, aux_loss = out.y_BTD, out.stats.aux_loss          # add aux_loss to the loss
    """

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

    def expert_weights(self, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(gate_EDF, up_EDF, down_EFD) cast to the compute `dtype`."""
        return (self.gate_EDF[...].astype(dtype), self.up_EDF[...].astype(dtype),
                self.down_EFD[...].astype(dtype))

    def __call__(self, x_BTD: jax.Array) -> MoEOutput:
        """Routes the B*T tokens once, runs their experts (one of the paths of the module
        docstring) and adds the shared experts."""
        c = self.config
        b, t, d = x_BTD.shape
        x_TD = x_BTD.reshape(b * t, d)
        r = self.router(x_TD)
        weights = self.expert_weights(x_BTD.dtype)
        if moe_parallel.use_parallel(c):  # a multi-device mesh is active: shard_map path
            y_TD, n_dropped = moe_parallel.routed_experts(
                x_TD, r.experts_TK, r.weights_TK, r.affinity_TK, *weights, c)
            dropped = n_dropped / r.experts_TK.size
        elif c.moe_impl == "dropless":
            y_TD, dropped = dropless_experts(x_TD, r.experts_TK, r.weights_TK, *weights)
        else:
            y_TD, dropped = capacity_experts(x_TD, r.experts_TK, r.weights_TK, r.affinity_TK,
                                             expert_capacity(b * t, c), *weights)
        y_BTD = y_TD.astype(x_BTD.dtype).reshape(b, t, d)
        if self.shared is not None:
            y_BTD = y_BTD + self.shared(x_BTD)
        e = c.n_routed_experts
        aux, losses = balance_losses(
            r.scores_TE.reshape(b, t, e), r.experts_TK.reshape(b, t, -1),
            r.logits_TE.reshape(b, t, e), placement_config(c),
        )
        tokens_per_expert = jnp.bincount(r.experts_TK.reshape(-1), length=e)
        stats = MoEStats(aux_loss=aux, losses=losses,
                         tokens_per_expert=tokens_per_expert.astype(jnp.float32),
                         dropped_fraction=dropped)
        return MoEOutput(y_BTD=y_BTD, stats=stats)
