"""Load-balancing objectives for DeepSeekMoE and the V3 aux-loss-free bias update.

All losses are computed per sequence (`seq_aux=True`, as the HF remote code does) and averaged
over the batch; with `seq_aux=False` the whole batch counts as one sequence.
  f_i  = E / (K T) * #{t : t -> i}           P_i  = mean_t s_{i,t}
  expert-level (V2, alpha_1):    sum_i f_i P_i
  device-level (V2, alpha_2):    sum_d mean_{i in d}(f_i) * sum_{i in d} P_i
  communication (V2, alpha_3):   sum_d D/(M T) #{t sent to d} * sum_{i in d} P_i
  sequence-wise (V3, alpha):     sum_i f_i mean_t(s_{i,t} / sum_j s_{j,t})
  router z-loss:                 mean_t logsumexp(z_t)^2
Devices d are `expert_devices` contiguous blocks of experts (the expert-parallel placement).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mla_moe.config import ModelConfig


def balance_losses(
    scores_BTE: jax.Array, experts_BTK: jax.Array, logits_BTE: jax.Array, config: ModelConfig
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns (weighted total, {name: unweighted loss}) for the losses with non-zero weight."""
    c = config
    if not c.seq_aux:
        b, t, e = scores_BTE.shape
        scores_BTE = scores_BTE.reshape(1, b * t, e)
        logits_BTE = logits_BTE.reshape(1, b * t, e)
        experts_BTK = experts_BTK.reshape(1, b * t, -1)
    _, t, e = scores_BTE.shape
    k = experts_BTK.shape[-1]
    d, m = c.num_expert_devices, c.num_device_limit
    # Counts by a scatter-add of the B*T*K choices: a one-hot [B, T, K, E] summed over T and K
    # is materialised by XLA:CPU, 40 ms against 0.5 ms at T=16384, K=16, E=64.
    b = experts_BTK.shape[0]
    count_BE = jnp.zeros((b, e), jnp.float32).at[jnp.arange(b)[:, None, None], experts_BTK].add(1.0)
    f_BE = count_BE * (e / (k * t))
    p_BE = scores_BTE.mean(1)
    losses, weighted = {}, jnp.zeros((), jnp.float32)

    def add(name, alpha, value_fn):
        nonlocal weighted
        if alpha > 0:
            value = value_fn()
            losses[name] = value
            weighted = weighted + alpha * value

    add("expert_balance", c.aux_loss_alpha, lambda: jnp.mean(jnp.sum(f_BE * p_BE, -1)))

    def device_p():
        return p_BE.reshape(p_BE.shape[0], d, e // d).sum(-1)

    add(
        "device_balance",
        c.device_balance_alpha,
        lambda: jnp.mean(jnp.sum(f_BE.reshape(-1, d, e // d).mean(-1) * device_p(), -1)),
    )

    def comm():
        device_BTK = experts_BTK // (e // d)
        sent_BTD = jnp.any(device_BTK[..., None] == jnp.arange(d), axis=2).astype(jnp.float32)
        f2_BD = sent_BTD.sum(1) * (d / (m * t))
        return jnp.mean(jnp.sum(f2_BD * device_p(), -1))

    add("comm_balance", c.comm_balance_alpha, comm)

    def seq_balance():
        s_norm_BTE = scores_BTE / (scores_BTE.sum(-1, keepdims=True) + 1e-20)
        return jnp.mean(jnp.sum(f_BE * s_norm_BTE.mean(1), -1))

    add("seq_balance", c.seq_balance_alpha, seq_balance)
    add(
        "router_z",
        c.router_z_loss_coef,
        lambda: jnp.mean(jax.nn.logsumexp(logits_BTE, axis=-1) ** 2),
    )
    return weighted, losses


def update_expert_bias(bias_E: jax.Array, tokens_per_expert_E: jax.Array, rate: float) -> jax.Array:
    """V3 aux-loss-free balancing: b_i += rate * sign(mean(c) - c_i).

    Overloaded experts (above the mean load) become less attractive to the selection, and
    underloaded ones more. `tokens_per_expert_E` should be the global count (summed over the
    data-parallel shards) so that every shard applies the same update.
    """
    counts = tokens_per_expert_E.astype(jnp.float32)
    return bias_E + rate * jnp.sign(counts.mean() - counts)
