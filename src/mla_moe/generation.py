"""Batched autoregressive generation over a preallocated latent KV cache.

    new_tokens = mla_moe.generate(model, [[5, 7, 9], [3]], max_new_tokens=32)

1. Prompts are right-padded to a length bucket (a power of two up to `prefill_chunk`, then a
   multiple of it) and prefilled in chunks of at most `prefill_chunk` tokens with naive MLA
   (decompressed K/V: the cheaper form when many queries share the keys). Slots past a
   prompt's true length hold padding; setting `lengths_B` back to the true lengths masks them,
   and decoding overwrites them.
2. One jitted `lax.while_loop` then decodes with absorbed MLA (attention over the latent),
   one token per step, the cache donated into it. It stops when every row has emitted EOS
   or `max_new_tokens` tokens.

Compiled shapes depend only on (batch, prompt bucket or chunk, cache bucket, max_new_tokens),
so prompts of different lengths within a bucket reuse the same executables.

With `mesh=`, the model runs sharded as in training (`sharding.on_mesh`): each weight placed by
the sharding rules (experts over `expert`, heads and FFN hidden over `tensor`, ...), the MoE
layers expert-parallel, and the latent cache split over the batch axes. The cache has no
head dimension to split (MLA's one latent per token), so tensor-parallel ranks each hold
their batch rows' whole cache.

Legend: see layers.py. T counts the tokens of a call: a padded prompt, a prefill chunk, or the
new tokens of a row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mla_moe import sharding
from mla_moe.cache import KVCache, init_cache
from mla_moe.config import ModelConfig
from mla_moe.decoder import DeepSeekModel
from mla_moe.sampling import Sampling, sample
from pallas_kernels.dispatch import next_pow2, round_up

PREFILL_CHUNK = 512
MIN_BUCKET = 16
MIN_CACHE = 64
PAD_ID = 0


def prompt_bucket(length: int, chunk: int = PREFILL_CHUNK) -> int:
    """Padded prompt length: a power of two (>= 16) up to `chunk`, then a multiple of it."""
    if length <= chunk:
        return min(max(MIN_BUCKET, next_pow2(length)), chunk)
    return round_up(length, chunk)


def cache_bucket(config: ModelConfig, needed: int) -> int:
    """Cache slots: a power of two >= `needed` (>= 64), capped at max_position_embeddings."""
    if needed > config.max_position_embeddings:
        raise ValueError(
            f"prompt + max_new_tokens needs {needed} positions, more than "
            f"max_position_embeddings={config.max_position_embeddings}"
        )
    return min(max(MIN_CACHE, next_pow2(needed)), config.max_position_embeddings)


def pad_prompts(prompts: Sequence[Sequence[int]], vocab_size: int, bucket: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [B, bucket] int32 right-padded with PAD_ID, lengths [B] int32)."""
    if not prompts:
        raise ValueError("prompts: need at least one prompt")
    tokens = np.full((len(prompts), bucket), PAD_ID, np.int32)
    lengths = np.zeros((len(prompts),), np.int32)
    for i, p in enumerate(prompts):
        p = np.asarray(p, np.int64).reshape(-1)
        if p.size == 0:
            raise ValueError(f"prompts[{i}] is empty")
        if p.size > bucket:
            raise ValueError(f"prompts[{i}] has {p.size} tokens, more than the bucket {bucket}")
        if p.min() < 0 or p.max() >= vocab_size:
            raise ValueError(f"prompts[{i}] has token ids outside [0, {vocab_size})")
        tokens[i, : p.size] = p
        lengths[i] = p.size
    return tokens, lengths


# --- jitted pieces ---------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _prefill_chunk(graphdef, state, tokens_BT, cache, last_B, h_last_BD):
    """Appends one chunk (naive MLA). Returns (hidden [B, T, D], hidden at each row's
    position `last_B` if it lies in this chunk else `h_last_BD`, cache)."""
    model = nnx.merge(graphdef, state)
    start_B = cache.lengths_B
    out = model(tokens_BT, cache=cache, attention_form="naive")
    idx_B = last_B - start_B
    inside_B = (idx_B >= 0) & (idx_B < tokens_BT.shape[1])
    h_BD = jnp.take_along_axis(
        out.hidden, jnp.clip(idx_B, 0, tokens_BT.shape[1] - 1)[:, None, None], axis=1
    )[:, 0]
    return out.hidden, jnp.where(inside_B[:, None], h_BD, h_last_BD), out.cache


def prefill(model: DeepSeekModel, tokens_BT: np.ndarray | jax.Array,
            lengths_B: np.ndarray | jax.Array, cache: KVCache, *, chunk: int = PREFILL_CHUNK
            ) -> tuple[jax.Array, jax.Array, KVCache]:
    """Writes the padded prompts into `cache` (donated) `chunk` tokens at a time.

    Returns (hidden at each prompt's last token [B, D], hidden of every prompt position
    [B, T, D], cache with lengths_B = the true prompt lengths).
    """
    graphdef, params = nnx.split(model)
    tokens_BT = jnp.asarray(tokens_BT, jnp.int32)
    lengths_B = jnp.asarray(lengths_B, jnp.int32)
    b, t = tokens_BT.shape
    if t > chunk and t % chunk:
        raise ValueError(f"padded prompt length {t} must be <= chunk={chunk} or a multiple")
    h_last_BD = jnp.zeros((b, model.config.hidden_size), jnp.dtype(model.config.dtype))
    hidden = []
    for start in range(0, t, min(t, chunk)):
        h_BTD, h_last_BD, cache = _prefill_chunk(
            graphdef, params, tokens_BT[:, start : start + chunk], cache, lengths_B - 1,
            h_last_BD,
        )
        hidden.append(h_BTD)
    hidden_BTD = hidden[0] if len(hidden) == 1 else jnp.concatenate(hidden, axis=1)
    return h_last_BD, hidden_BTD, cache.replace(lengths_B=lengths_B)


@functools.partial(jax.jit, static_argnames=("graphdef", "form"), donate_argnames=("cache",))
def decode_step(graphdef: nnx.GraphDef, state: nnx.State, tokens_BT: jax.Array, cache: KVCache,
                form: str = "absorbed") -> tuple[jax.Array, jax.Array, KVCache]:
    """One cached forward step: (logits [B, T, U] float32, hidden [B, T, D], cache)."""
    model = nnx.merge(graphdef, state)
    out = model(tokens_BT, cache=cache, attention_form=form)
    return out.logits, out.hidden, out.cache


def eos_array(eos_id: int | None) -> jax.Array:
    """EOS as a traced int32 scalar (-1: none), so it does not key the compilation cache."""
    return jnp.int32(-1 if eos_id is None else eos_id)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "form"),
                   donate_argnames=("cache",))
def _decode_loop(graphdef, state, cache, h_last_BD, key, max_new, eos_id, *, sampling, form):
    """Decodes until every row is done or `max_new` tokens (both traced: the executable
    depends only on the batch and cache shapes). Returns ([B, T] tokens with T = S, -1 past
    the end)."""
    model = nnx.merge(graphdef, state)
    b = h_last_BD.shape[0]

    def is_eos(tok_B):
        return tok_B == eos_id

    key, sub = jax.random.split(key)
    tok_B = sample(model.logits(h_last_BD[:, None])[:, 0], sub, sampling)
    out_BT = jnp.full((b, cache.max_length), -1, jnp.int32).at[:, 0].set(tok_B)

    def cond(carry):
        step, _, _, done_B, _, _ = carry
        return (step < max_new) & ~jnp.all(done_B)

    def body(carry):
        step, tok_B, cache, done_B, out_BT, key = carry
        out = model(tok_B[:, None], cache=cache, attention_form=form)
        logits_BU, cache = out.logits[:, 0], out.cache
        key, sub = jax.random.split(key)
        nxt_B = sample(logits_BU, sub, sampling)
        out_BT = jax.lax.dynamic_update_slice(
            out_BT, jnp.where(done_B, -1, nxt_B)[:, None], (0, step)
        )
        return step + 1, nxt_B, cache, done_B | is_eos(nxt_B), out_BT, key

    carry = (jnp.int32(1), tok_B, cache, is_eos(tok_B), out_BT, key)
    steps, _, cache, _, out_BT, _ = jax.lax.while_loop(cond, body, carry)
    return out_BT, steps, cache


def trim(tokens_BT: np.ndarray | jax.Array, eos_id: int | None, max_new: int
         ) -> list[list[int]]:
    """Rows as lists, cut after the first EOS (kept) and at max_new; -1 marks no token."""
    result = []
    for row in np.asarray(tokens_BT):
        out = []
        for t in row[:max_new]:
            if t < 0:
                break
            out.append(int(t))
            if eos_id is not None and t == eos_id:
                break
        result.append(out)
    return result


@dataclasses.dataclass(frozen=True)
class Prefilled:
    """Where every generator starts: the prompts in the cache, the model as it decodes."""

    model: DeepSeekModel  # unstacked, on the mesh
    graphdef: nnx.GraphDef
    state: nnx.State
    tokens_BT: np.ndarray  # the prompts, right-padded with PAD_ID
    lengths_B: np.ndarray  # the prompts' true lengths
    slots: int  # S, the cache slots per row
    cache: KVCache  # holding the prompts, lengths_B = the true lengths
    h_last_BD: jax.Array  # hidden at each prompt's last token
    hidden_BTD: jax.Array  # hidden at every prompt position


@contextlib.contextmanager
def prefilled(model: DeepSeekModel, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
              fp8: bool = False, cache_dtype: jax.typing.DTypeLike | None = None,
              prefill_chunk: int = PREFILL_CHUNK, mesh: jax.sharding.Mesh | None = None,
              extra_slots: int = 0) -> Iterator[Prefilled]:
    """Pads `prompts` to their bucket, places `model` on `mesh` (`sharding.on_mesh`) and
    unstacks it, allocates a cache with room for `max_new_tokens` (+ `extra_slots`) and
    prefills it; yields the result with the mesh active for the decoding that follows."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    config = model.config
    longest = max((len(p) for p in prompts), default=0)
    bucket = prompt_bucket(longest, prefill_chunk)
    tokens_BT, lengths_B = pad_prompts(prompts, config.vocab_size, bucket)
    slots = cache_bucket(config, max(bucket, int(lengths_B.max()) + max_new_tokens + extra_slots))
    with sharding.on_mesh(model, mesh) as model:
        model = model.unstacked()
        cache = init_cache(config, len(prompts), slots, cache_dtype, fp8=fp8)
        cache = sharding.place_cache(cache, mesh)
        h_last_BD, hidden_BTD, cache = prefill(model, tokens_BT, lengths_B, cache,
                                               chunk=prefill_chunk)
        yield Prefilled(model, *nnx.split(model), tokens_BT, lengths_B, slots, cache,
                        h_last_BD, hidden_BTD)


def generate(
    model: DeepSeekModel,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: Sampling | None = None,
    eos_id: int | None = None,
    seed: int = 0,
    fp8: bool = False,
    cache_dtype: jax.typing.DTypeLike | None = None,
    prefill_chunk: int = PREFILL_CHUNK,
    decode_form: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> list[list[int]]:
    """Generates up to `max_new_tokens` new tokens for each prompt (a list of token ids).

    sampling: None (greedy) or a `Sampling`; `seed` seeds it. eos_id: a row stops after
    emitting it (the EOS is included). fp8: the FP8 latent cache (fp8_cache.py) instead of
    `cache_dtype` (default: the model's compute dtype). decode_form: "absorbed" or "naive"
    (default: the config's `decode_attention`). mesh: run sharded on this mesh
    (`sharding.on_mesh`).
    Returns the new tokens of each prompt.

    Decoding runs `model.unstacked()`, which copies the stacked layer weights once per call;
    when memory is tight, pass `model = model.unstacked()` (and drop the stacked model): an
    unstacked model is used as it is.
    """
    with prefilled(model, prompts, max_new_tokens=max_new_tokens, fp8=fp8,
                   cache_dtype=cache_dtype, prefill_chunk=prefill_chunk, mesh=mesh) as start:
        out_BT, _, _ = _decode_loop(
            start.graphdef, start.state, start.cache, start.h_last_BD, jax.random.key(seed),
            jnp.int32(max_new_tokens), eos_array(eos_id), sampling=sampling,
            form=decode_form or model.config.decode_attention,
        )
    return trim(out_BT, eos_id, max_new_tokens)
