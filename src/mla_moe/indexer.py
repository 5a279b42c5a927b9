"""DeepSeek-V3.2's lightning indexer: which previous tokens each query's MLA attends to.

DeepSeek Sparse Attention (DSA) scores every visible key s for query t with a few small heads,

    I[t, s] = sum_h w[t, h] * relu(q[t, h] . k[s] * d^-0.5),   w = weights_proj(x) * n^-0.5

and the main attention then sees only the `index_topk` keys of highest I (all of them while
fewer are visible, which makes a short sequence exactly dense V3). q comes from the MLA's query
latent (wq_b over q_norm(wq_a x)), k = LayerNorm(wk x) is one key per token shared by every
indexer head. The first R = qk_rope_head_dim dims of q and k are roped with the MLA's own
(YaRN) frequencies but in the half-split layout (pairs i, i + R/2), while the main MLA rotates
interleaved pairs. `weights_proj` and the scores run in float32.

Legend: see layers.py; this module's own letters: n the indexer heads (`index_n_heads`), d the
indexer head dim (`index_head_dim`); and K the selected keys per query (`index_topk`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mla_moe.config import ModelConfig
from mla_moe.layers import dense, param
from mla_moe.rope import apply_rope

KEY_NORM_EPS = 1e-6  # the indexer's LayerNorm eps (hard-coded in the reference)
_NEG = -jnp.inf


def layer_norm(x: jax.Array, weight: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis in float32 (mean and biased variance), cast back."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * weight.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


class Indexer(nnx.Module):
    """The lightning indexer of one layer (weights as HF names them, einsum-ready):
    wq_b_QHI [Q, n, d], wk_DI [D, d], k_norm (LayerNorm weight and bias [d]),
    weights_proj_DH [D, n] kept in float32 whatever the parameter dtype. The parameters keep
    the names checkpoints and the HF mapping know them by, whose H and I are n and d."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = c = config
        hidden, q, n, d = c.hidden_size, c.q_lora_rank, c.index_n_heads, c.index_head_dim
        std, pd = c.initializer_range, c.param_dtype
        self.wq_b_QHI = param(rngs, (q, n, d), ("q_lora", None, None), dtype=pd, stddev=std)
        self.wk_DI = param(rngs, (hidden, d), ("embed", None), dtype=pd, stddev=std)
        self.k_norm_weight = param(rngs, (d,), ("norm",), dtype=pd, value=1.0)
        self.k_norm_bias = param(rngs, (d,), ("norm",), dtype=pd, value=0.0)
        self.weights_proj_DH = param(rngs, (hidden, n), ("embed", None), dtype="float32",
                                     stddev=std)

    def _rope(self, x_BTxd: jax.Array, positions_BT: jax.Array) -> jax.Array:
        """The first R dims of [B, T, (n,) d] roped (half-split pairs)."""
        r = self.config.qk_rope_head_dim
        roped = apply_rope(x_BTxd[..., :r], positions_BT, self.config, interleave=False)
        return jnp.concatenate([roped, x_BTxd[..., r:]], axis=-1)

    def queries(self, cq_BTQ: jax.Array, positions_BT: jax.Array) -> jax.Array:
        """q [B, T, n, d] (roped) from the MLA's normed query latent."""
        q_BTnd = dense(cq_BTQ, self.wq_b_QHI[...].astype(cq_BTQ.dtype))
        return self._rope(q_BTnd, positions_BT)

    def keys(self, x_BTD: jax.Array, positions_BT: jax.Array) -> jax.Array:
        """k [B, T, d] (normed, roped): one key per token for every indexer head."""
        k_BTd = dense(x_BTD, self.wk_DI[...].astype(x_BTD.dtype))
        k_BTd = layer_norm(k_BTd, self.k_norm_weight[...], self.k_norm_bias[...], KEY_NORM_EPS)
        return self._rope(k_BTd, positions_BT)

    def weights(self, x_BTD: jax.Array) -> jax.Array:
        """w [B, T, n] float32: each indexer head's weight for its query, times n^-0.5."""
        w_BTn = dense(x_BTD.astype(jnp.float32), self.weights_proj_DH[...])
        return w_BTn * self.config.index_n_heads**-0.5


def index_scores(q_BTnd: jax.Array, w_BTn: jax.Array, k_BSd: jax.Array) -> jax.Array:
    """I [B, T, S] float32 = sum_h w[t, h] relu(q[t, h] . k[s] / sqrt(d)) (no mask)."""
    scale = q_BTnd.shape[-1] ** -0.5
    s_BTnS = jnp.einsum("BTnd,BSd->BTnS", q_BTnd, k_BSd.astype(q_BTnd.dtype),
                        preferred_element_type=jnp.float32)
    return jnp.einsum("BTnS,BTn->BTS", jax.nn.relu(s_BTnS * scale), w_BTn)


def top_k(scores_BTS: jax.Array, visible_BTS: jax.Array, k: int) -> jax.Array:
    """The indices [B, T, min(k, S)] of each row's highest visible scores, -1 where a row has
    fewer than k visible keys (those picks are not keys at all). Ties go to whatever
    `lax.top_k` picks: the selection is a set."""
    k = min(k, scores_BTS.shape[-1])
    masked_BTS = jnp.where(visible_BTS, scores_BTS, _NEG)
    _, idx_BTK = jax.lax.top_k(masked_BTS, k)
    valid_BTK = jnp.take_along_axis(visible_BTS, idx_BTK, axis=-1)
    return jnp.where(valid_BTK, idx_BTK, -1).astype(jnp.int32)


def selection_mask(idx_BTK: jax.Array, num_keys: int) -> jax.Array:
    """[B, T, S] bool, True at the keys `idx_BTK` names, by one scatter (entries < 0 name
    none: they write to an extra column that is dropped)."""
    b, t, _ = idx_BTK.shape
    target_BTK = jnp.where(idx_BTK < 0, num_keys, idx_BTK)
    rows_BTS = jnp.zeros((b, t, num_keys + 1), jnp.bool_)
    bi, ti = jnp.arange(b)[:, None, None], jnp.arange(t)[None, :, None]
    return rows_BTS.at[bi, ti, target_BTK].set(True)[..., :num_keys]
