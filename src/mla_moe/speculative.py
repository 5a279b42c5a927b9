"""Greedy speculative decoding with the model's own MTP module as the drafter (DeepSeek-V3).

State between steps, per row: the main cache holds tokens t_0..t_{n-1}; t_n is the last
emitted token, not yet fed; d is the MTP draft for t_{n+1}. One step:
  verify  main model on [t_n, d] at positions n, n+1 (T = 2, absorbed MLA over the cache):
          p_0 = argmax at n (the true t_{n+1}), p_1 = argmax at n+1 (true t_{n+2} iff d == p_0)
  commit  accepted (d == p_0): emit d, p_1; the cache keeps both slots (length n + 2).
          rejected:            emit p_0; the cache length goes back to n + 1 (slot n+1 is
          stale, masked, and overwritten next step).
  draft   MTP module 1 at position i reads the main hidden h_i and Emb(t_{i+1}) and predicts
          t_{i+2}: it runs on positions n, n+1 with tokens [e_0, e_1] (its own latent cache is
          written at both slots, and rolled back like the main one), and the new draft is its
          argmax at the last committed position.
Every emitted token is the main model's argmax given the true prefix, so the output equals
plain greedy decoding; the MTP module only decides how many tokens each step yields.

Only the first MTP module drafts (one token per step), as DeepSeek-V3 deploys it.

The MTP module's latent cache is a `KVCache` with one array per MTP module
(`init_cache(..., mtp=True)`).

Legend: see layers.py. T counts the tokens of a call: a padded prompt, a prefill chunk, or the
new tokens of a row.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mla_moe import sharding
from mla_moe.cache import KVCache, init_cache
from mla_moe.decoder import DeepSeekModel
from mla_moe.generation import PREFILL_CHUNK, Prefilled, eos_array, prefilled, trim


def _mtp_logits(model, h_BTD, next_tokens_BT, mcache: KVCache, form):
    """MTP module 1 at positions mcache.lengths_B + t: (logits [B, T, U], cache)."""
    block = model.mtp[0]
    t = h_BTD.shape[1]
    positions_BT = mcache.lengths_B[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    h_BTD, layer_cache, _, _ = block(h_BTD, model.embed(next_tokens_BT), positions_BT, None,
                                     mcache.layer(0), mcache.lengths_B, form)
    latent_BSW, keys = ((layer_cache[0], (layer_cache[1],) + mcache.index_keys[1:])
                        if mcache.index_keys else (layer_cache, ()))
    return model.logits(h_BTD, block.norm), KVCache(
        latents=(latent_BSW,) + mcache.latents[1:], lengths_B=mcache.lengths_B + t,
        index_keys=keys)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("mcache",))
def _mtp_prefill_chunk(graphdef, state, h_BTD, next_tokens_BT, mcache, last_B, draft_B):
    """MTP over one prompt chunk; returns (draft at each row's `last_B` if in this chunk,
    cache)."""
    model = nnx.merge(graphdef, state)
    start_B = mcache.lengths_B
    logits_BTU, mcache = _mtp_logits(model, h_BTD, next_tokens_BT, mcache, "naive")
    t = h_BTD.shape[1]
    idx_B = last_B - start_B
    inside_B = (idx_B >= 0) & (idx_B < t)
    pick_BU = jnp.take_along_axis(logits_BTU, jnp.clip(idx_B, 0, t - 1)[:, None, None],
                                  axis=1)[:, 0]
    return jnp.where(inside_B, jnp.argmax(pick_BU, -1).astype(jnp.int32), draft_B), mcache


def _mtp_prefill(start: Prefilled, tok_B: jax.Array, mcache: KVCache, chunk: int
                 ) -> tuple[jax.Array, KVCache]:
    """The MTP module over the prompts, `chunk` positions at a time: position i pairs h_i with
    token i+1, the last prompt position with the first generated token `tok_B`. Returns (the
    first draft [B], mcache with lengths_B = the prompt lengths)."""
    b, bucket = start.tokens_BT.shape
    lengths_B = jnp.asarray(start.lengths_B)
    next_BT = jnp.pad(jnp.asarray(start.tokens_BT)[:, 1:], ((0, 0), (0, 1)))
    next_BT = next_BT.at[jnp.arange(b), lengths_B - 1].set(tok_B)
    draft_B = jnp.zeros((b,), jnp.int32)
    step = min(bucket, chunk)
    for i in range(0, bucket, step):
        draft_B, mcache = _mtp_prefill_chunk(
            start.graphdef, start.state, start.hidden_BTD[:, i : i + step],
            next_BT[:, i : i + step], mcache, lengths_B - 1, draft_B,
        )
    return draft_B, mcache.replace(lengths_B=lengths_B)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _first_token(graphdef, state, h_last_BD):
    """The greedy token after each prompt: [B] int32."""
    model = nnx.merge(graphdef, state)
    return jnp.argmax(model.logits(h_last_BD[:, None])[:, 0], -1).astype(jnp.int32)


@functools.partial(
    jax.jit, static_argnames=("graphdef", "form", "draft_fn"), donate_argnames=("cache", "mcache"),
)
def _speculative_loop(graphdef, state, cache, mcache, tok_B, draft_B, max_new, eos_id, *, form,
                      draft_fn):
    """Verify, commit and draft until every row is done (see the module docstring). Returns
    ([B, T] tokens with T = S + 2, -1 past the end; accepted [B]; drafted [B]; cache; mcache)."""
    model = nnx.merge(graphdef, state)
    b = tok_B.shape[0]
    # Up to two tokens per step: room for one overflow past max_new (<= S - 2), and a
    # scratch column (the last) where rows that commit nothing write.
    width = cache.max_length + 2
    dump = width - 1
    out_BT = jnp.full((b, width), -1, jnp.int32).at[:, 0].set(tok_B)
    count_B = jnp.ones((b,), jnp.int32)

    def is_eos(tok_B):
        return tok_B == eos_id

    if draft_fn is not None:
        draft_B = draft_fn(draft_B, count_B)
    done_B = is_eos(tok_B) | (count_B >= max_new)
    zeros = jnp.zeros((b,), jnp.int32)

    def cond(carry):
        return ~jnp.all(carry[6])

    def body(carry):
        cache, mcache, tok_B, draft_B, count_B, out_BT, done_B, accepted_B, drafted_B = carry
        n_B = cache.lengths_B
        out = model(jnp.stack([tok_B, draft_B], axis=1), cache=cache, attention_form=form)
        pred_B2 = jnp.argmax(out.logits, axis=-1).astype(jnp.int32)
        acc_B = pred_B2[:, 0] == draft_B
        e0_B = pred_B2[:, 0]  # equals draft_B when accepted
        e1_B = pred_B2[:, 1]  # meaningful only when accepted
        live_B = ~done_B
        step_B = jnp.where(live_B, 1 + acc_B, 0).astype(jnp.int32)
        rows = jnp.arange(b)
        out_BT = out_BT.at[rows, jnp.where(live_B, count_B, dump)].set(e0_B)
        out_BT = out_BT.at[rows, jnp.where(live_B & acc_B, count_B + 1, dump)].set(e1_B)
        cache = out.cache.replace(lengths_B=n_B + step_B)
        new_tok_B = jnp.where(acc_B, e1_B, e0_B)
        # Draft for the next step from the last committed position.
        m_logits_BTU, mcache = _mtp_logits(model, out.hidden, jnp.stack([e0_B, e1_B], axis=1),
                                           mcache.replace(lengths_B=n_B), form)
        new_draft_B = jnp.argmax(
            jnp.where(acc_B[:, None], m_logits_BTU[:, 1], m_logits_BTU[:, 0]), -1
        ).astype(jnp.int32)
        mcache = mcache.replace(lengths_B=n_B + step_B)
        new_count_B = count_B + step_B
        if draft_fn is not None:
            new_draft_B = draft_fn(new_draft_B, new_count_B)
        eos_B = is_eos(e0_B) | (acc_B & is_eos(e1_B))
        done_B = done_B | (live_B & eos_B) | (new_count_B >= max_new)
        return (cache, mcache, jnp.where(live_B, new_tok_B, tok_B),
                jnp.where(live_B, new_draft_B, draft_B), new_count_B, out_BT, done_B,
                accepted_B + (live_B & acc_B), drafted_B + live_B)

    carry = (cache, mcache, tok_B, draft_B, count_B, out_BT, done_B, zeros, zeros)
    carry = jax.lax.while_loop(cond, body, carry)
    cache, mcache, _, _, _, out_BT, _, accepted_B, drafted_B = carry
    return out_BT, accepted_B, drafted_B, cache, mcache


@flax.struct.dataclass
class SpeculativeStats:
    """Per-row counts of a `speculative_generate` call."""

    accepted: np.ndarray  # [B] drafts accepted per row
    drafted: np.ndarray  # [B] verification steps per row (one draft each)

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafts over all drafts, over every row."""
        return float(self.accepted.sum() / max(1, self.drafted.sum()))

    @property
    def tokens_per_step(self) -> float:
        """Mean tokens committed per main-model call (1 + acceptance rate)."""
        return 1.0 + self.acceptance_rate


def speculative_generate(
    model: DeepSeekModel,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_id: int | None = None,
    fp8: bool = False,
    cache_dtype: jax.typing.DTypeLike | None = None,
    prefill_chunk: int = PREFILL_CHUNK,
    draft_fn: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[list[list[int]], SpeculativeStats]:
    """Greedy generation drafted by MTP module 1 and verified by the main model.

    Returns (new tokens per prompt, identical to `generate(..., sampling=None)`, and the
    acceptance statistics). draft_fn(mtp_draft_B, emitted_count_B) -> draft_B may replace
    the MTP draft (tests use it to force accepts and rejects); it is a static argument.
    mesh: run sharded on this mesh (`sharding.on_mesh`).
    """
    config = model.config
    if not config.num_nextn_predict_layers or not len(model.mtp):
        raise ValueError("speculative_generate needs a model with MTP modules "
                         "(num_nextn_predict_layers >= 1)")
    # Verification writes two slots past the committed length.
    with prefilled(model, prompts, max_new_tokens=max_new_tokens, fp8=fp8,
                   cache_dtype=cache_dtype, prefill_chunk=prefill_chunk, mesh=mesh,
                   extra_slots=2) as start:
        mcache = init_cache(config, len(prompts), start.slots, cache_dtype, fp8=fp8, mtp=True)
        mcache = sharding.place_cache(mcache, mesh)
        tok_B = _first_token(start.graphdef, start.state, start.h_last_BD)
        draft_B, mcache = _mtp_prefill(start, tok_B, mcache, prefill_chunk)
        out_BT, accepted_B, drafted_B, _, _ = _speculative_loop(
            start.graphdef, start.state, start.cache, mcache, tok_B, draft_B,
            jnp.int32(max_new_tokens), eos_array(eos_id), form=config.decode_attention,
            draft_fn=draft_fn,
        )
    stats = SpeculativeStats(accepted=np.asarray(accepted_B), drafted=np.asarray(drafted_B))
    return trim(out_BT, eos_id, max_new_tokens), stats
