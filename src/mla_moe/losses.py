"""Language-model losses: next-token cross-entropy and the V3 multi-token-prediction loss, each
over whole logits or fused with the head a chunk of tokens at a time (training's form)."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from mla_moe import sharding
from mla_moe.context_parallel import shift_left


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


def mtp_targets(tokens_BT: jax.Array, k: int, segment_ids_BT: jax.Array | None = None,
                weights_BT: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(targets_BT, valid_BT) of MTP module k: position i predicts token i + k + 1; positions
    whose target lies past the end, in another segment, or has zero weight are not valid."""
    # Shifts along the sequence in its own order, whatever the layout (context_parallel.py).
    shift = k + 1
    targets_BT = shift_left(tokens_BT, shift)
    valid_BT = shift_left(jnp.ones(tokens_BT.shape, bool), shift, fill=False)
    if segment_ids_BT is not None:
        seg_target = shift_left(segment_ids_BT, shift, fill=-1)
        valid_BT = valid_BT & (seg_target == segment_ids_BT)
    if weights_BT is not None:
        w_target = shift_left(weights_BT, shift)
        valid_BT = valid_BT & (w_target > 0)
    return targets_BT, valid_BT


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
    return mtp_mean(*mtp_loss_sums(mtp_logits_IBTU, tokens_BT, segment_ids_BT, weights_BT))


def mtp_loss_sums(
    mtp_logits_IBTU: jax.Array,
    tokens_BT: jax.Array,
    segment_ids_BT: jax.Array | None = None,
    weights_BT: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(loss sums [I], target counts [I]), float32: module k's summed token losses and its
    number of valid targets (`mtp_targets`). A loss over several micro-batches adds both
    before dividing (`mtp_mean`), as one batch would."""
    sums, counts = [], []
    for k in range(1, mtp_logits_IBTU.shape[0] + 1):
        targets_BT, valid_BT = mtp_targets(tokens_BT, k, segment_ids_BT, weights_BT)
        loss_sum, count = cross_entropy(mtp_logits_IBTU[k - 1], targets_BT, valid_BT)
        sums.append(loss_sum)
        counts.append(count)
    return jnp.stack(sums), jnp.stack(counts)


def mtp_mean(sums_I: jax.Array, counts_I: jax.Array) -> jax.Array:
    """The MTP loss from `mtp_loss_sums`: the mean over modules of sum / count (a module with no
    valid target counts 0)."""
    return jnp.mean(sums_I / jnp.maximum(counts_I, 1.0))


# --- chunked cross-entropy: the head matmul fused with the loss, one token chunk at a time ---
#
# Training never holds the [tokens, vocab] float32 logits whole: a `lax.scan` over chunks of
# the sequence axis computes each chunk's logits, logsumexp and target logit, keeping only the
# per-token logsumexp. The backward (a `custom_vjp`) recomputes each chunk's logits, forms its
# softmax gradient and accumulates the head weight's gradient in float32 across chunks. Under a
# mesh the whole loss is one `shard_map`: every device chunks its own tokens (the batch stays
# split as it is), the vocabulary stays split over its axes (logsumexp and the target logit
# are reduced over them), and the head gradient is reduced over the token axes once, after the
# last chunk, instead of once per chunk.


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How the loss splits over the mesh: token axes (of B), vocab axes (of U), the axes
    the head gradient's D is scattered over (those of `embed` that also split the tokens),
    and the axes of T (`context`: context_parallel.py)."""

    tokens: tuple[str, ...] = ()
    vocab: tuple[str, ...] = ()
    scatter: tuple[str, ...] = ()
    token_shards: int = 1  # the product of the token axes' sizes
    chunks: int = 1
    length: tuple[str, ...] = ()
    length_shards: int = 1

    @property
    def every_token_axis(self) -> tuple[str, ...]:
        """The axes the tokens' sums are reduced over: those of B and of T."""
        return self.tokens + self.length


def _layout(b: int, d: int, u: int, t: int = 1) -> _Layout:
    mesh = sharding.active_mesh()
    if mesh is None or any(t != jax.sharding.AxisType.Auto for t in mesh.axis_types):
        return _Layout()
    rules, sizes = sharding.current_rules(), dict(mesh.shape)
    tok = sharding.dividing_axes("batch", b, mesh, rules)
    seq = sharding.dividing_axes("length", t, mesh, rules, exclude=tok, whole=True)
    voc = sharding.dividing_axes("vocab", u, mesh, rules, exclude=tok + seq)
    emb = sharding.dividing_axes("embed", d, mesh, rules, exclude=voc, whole=True)
    scatter = emb if emb and set(emb) <= set(tok + seq) else ()
    return _Layout(tok, voc, scatter, math.prod(sizes[a] for a in tok), length=seq,
                   length_shards=math.prod(sizes[a] for a in seq))


def _psum(x, axes):
    return jax.lax.psum(x, axes) if axes else x


def _chunked(a, n):
    """[B, T, ...] -> [n, B, T / n, ...], the scan's chunks."""
    b, t = a.shape[:2]
    return a.reshape(b, n, t // n, *a.shape[2:]).swapaxes(0, 1)


def _unchunked(a):
    """[n, B, T / n, ...] -> [B, T, ...]."""
    a = a.swapaxes(0, 1)
    return a.reshape(a.shape[0], -1, *a.shape[3:])


def _chunk_logits(x_BTD, w_DU):
    return jax.lax.dot_general(x_BTD, w_DU, (((2,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)


def _target_mask(logits_BTU, targets_BT, lay: _Layout):
    """Where the local vocabulary slice holds each token's target."""
    u = logits_BTU.shape[-1]
    offset = jax.lax.axis_index(lay.vocab) * u if lay.vocab else 0
    vocab_BTU = jax.lax.broadcasted_iota(jnp.int32, logits_BTU.shape, 2) + offset
    return vocab_BTU == targets_BT[..., None]


def _local_forward(lay: _Layout, x_BTD, w_DU, targets_BT, weights_BT):
    """This device's tokens: (sum of weighted losses over all devices, logz_BT, nll_BT)."""

    def body(loss, xs):
        x, tgt, wt = xs
        logits_BTU = _chunk_logits(x, w_DU)
        m_BT = jnp.max(logits_BTU, axis=-1)
        if lay.vocab:
            m_BT = jax.lax.pmax(m_BT, lay.vocab)
        sum_BT = _psum(jnp.sum(jnp.exp(logits_BTU - m_BT[..., None]), axis=-1), lay.vocab)
        logz_BT = m_BT + jnp.log(sum_BT)
        hit_BTU = _target_mask(logits_BTU, tgt, lay)
        target_BT = _psum(jnp.sum(jnp.where(hit_BTU, logits_BTU, 0.0), axis=-1), lay.vocab)
        nll_BT = logz_BT - target_BT
        return loss + jnp.sum(nll_BT * wt), (logz_BT, nll_BT)

    n = lay.chunks
    xs = (_chunked(x_BTD, n), _chunked(targets_BT, n), _chunked(weights_BT, n))
    carry = sharding.vary(jnp.zeros((), jnp.float32), lay.every_token_axis)
    loss, (logz_OBT, nll_OBT) = jax.lax.scan(body, carry, xs)
    return _psum(loss, lay.every_token_axis), _unchunked(logz_OBT), _unchunked(nll_OBT)


def _local_backward(lay: _Layout, x_BTD, w_DU, targets_BT, weights_BT, logz_BT, g):
    """(d x_BTD, d w_DU reduced over the token axes) for the loss's cotangent g."""

    def body(dw_DU, xs):
        x, tgt, wt, logz = xs
        logits_BTU = _chunk_logits(x, w_DU)
        p_BTU = jnp.exp(logits_BTU - logz[..., None])
        hit_BTU = _target_mask(logits_BTU, tgt, lay)
        dlogits_BTU = (p_BTU - hit_BTU) * (g * wt)[..., None]
        # The same products (and dtypes) as autodiff of the plain head matmul.
        dx_BTD = jax.lax.dot_general(dlogits_BTU, w_DU, (((2,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32)
        dx_BTD = _psum(dx_BTD, lay.vocab).astype(x.dtype)
        u = dlogits_BTU.shape[-1]
        dw_DU = dw_DU + jax.lax.dot_general(
            x.reshape(-1, x.shape[-1]), dlogits_BTU.reshape(-1, u), (((0,), (0,)), ((), ())),
            preferred_element_type=jnp.float32)
        return dw_DU, dx_BTD

    n = lay.chunks
    xs = (_chunked(x_BTD, n), _chunked(targets_BT, n), _chunked(weights_BT, n),
          _chunked(logz_BT, n))
    carry = sharding.vary(jnp.zeros(w_DU.shape, jnp.float32), lay.every_token_axis + lay.vocab)
    dw_DU, dx_OBTD = jax.lax.scan(body, carry, xs)
    # Summed over the chunks in float32, over devices in the head's dtype (as autodiff's
    # reduction of the plain matmul's gradient is): half the bytes over the links for bf16.
    dw_DU = dw_DU.astype(w_DU.dtype)
    if lay.scatter:
        dw_DU = jax.lax.psum_scatter(dw_DU, lay.scatter, scatter_dimension=0, tiled=True)
    dw_DU = _psum(dw_DU, tuple(a for a in lay.every_token_axis if a not in lay.scatter))
    return _unchunked(dx_OBTD), dw_DU


# The logical names of the loss's operands: per shard, the tokens' rows over the token axes,
# the head over the vocab axes, and the head gradient's D scattered (see `_sharded`).
_BTD, _BT = ("batch", "length", None), ("batch", "length")
_W_DU, _DW_DU = (None, "vocab"), ("embed", "vocab")


def _sharded(lay: _Layout, fn, args, in_names, out_names, out_shapes):
    """`fn(*args)` per shard (`sharding.per_shard`) under the loss's own rules: batch -> the
    token axes, vocab -> the vocab axes, embed -> the scatter axes; directly when the layout
    splits nothing."""
    if not (lay.tokens or lay.vocab or lay.length):
        return fn(*args)
    rules = sharding.Rules({"batch": lay.tokens, "vocab": lay.vocab, "embed": lay.scatter,
                            "length": lay.length})
    return sharding.per_shard(fn, args, in_names, out_names, out_shapes=out_shapes,
                              rules=rules, check_vma=True)


def _forward(lay: _Layout, x_BTD, w_DU, targets_BT, weights_BT):
    bt = targets_BT.shape
    return _sharded(lay, functools.partial(_local_forward, lay),
                    (x_BTD, w_DU, targets_BT, weights_BT), (_BTD, _W_DU, _BT, _BT),
                    ((), _BT, _BT), ((), bt, bt))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_loss(lay: _Layout, x_BTD, w_DU, targets_BT, weights_BT):
    return _forward(lay, x_BTD, w_DU, targets_BT, weights_BT)[0]


def _fused_loss_fwd(lay, x_BTD, w_DU, targets_BT, weights_BT):
    loss, logz_BT, nll_BT = _forward(lay, x_BTD, w_DU, targets_BT, weights_BT)
    return loss, (x_BTD, w_DU, targets_BT, weights_BT, logz_BT, nll_BT)


def _fused_loss_bwd(lay, res, g):
    x_BTD, w_DU, targets_BT, weights_BT, logz_BT, nll_BT = res
    dx_BTD, dw_DU = _sharded(
        lay, functools.partial(_local_backward, lay),
        (x_BTD, w_DU, targets_BT, weights_BT, logz_BT, g),
        (_BTD, _W_DU, _BT, _BT, _BT, ()), (_BTD, _DW_DU), (x_BTD.shape, w_DU.shape))
    d_targets = np.zeros(targets_BT.shape, jax.dtypes.float0)
    return dx_BTD, dw_DU, d_targets, (g * nll_BT).astype(weights_BT.dtype)


_fused_loss.defvjp(_fused_loss_fwd, _fused_loss_bwd)


def _num_chunks(t: int, target: int) -> int:
    """How many equal chunks T is cut into, each at most `target` positions: chunks that divide
    T when some length in [target / 2, target] does, else the fewest chunks (T padded). On
    TPU v5p the V3 head's loss at 49,152 tokens per chip compiled in 12 s with chunks dividing
    T = 4096, and ran past 200 s with T padded to 4102 or 4144."""
    for length in range(target, (target + 1) // 2 - 1, -1):
        if t % length == 0:
            return t // length
    return -(-t // target)


def chunked_cross_entropy(
    x_BTD: jax.Array, w_DU: jax.Array, targets_BT: jax.Array,
    weights_BT: jax.Array | None = None, *, chunk_tokens: int,
) -> tuple[jax.Array, jax.Array]:
    """`cross_entropy(x_BTD @ w_DU, targets_BT, weights_BT)` without the whole logits.

    x_BTD: the final-normed hidden states in the compute dtype; w_DU: the head weight (cast
    to x's dtype, as `DeepSeekModel.logits` does; its gradient is summed over the chunks in
    float32 and rounded to that dtype once, as the plain loss's). Logits are float32. Each
    device's tokens are split along T into chunks of about `chunk_tokens` tokens (B stays
    whole: chunk length max(1, chunk_tokens // local B)); T is padded to a whole number of
    chunks with zero-weight tokens. At most one [chunk, U] float32 block per device is live
    at a time, forward and backward. Returns (sum of weighted token losses,
    sum of weights), both float32 scalars.
    """
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be > 0, got {chunk_tokens}")
    b, t, d = x_BTD.shape
    if w_DU.shape[0] != d:
        raise ValueError(f"chunked_cross_entropy: x {x_BTD.shape} and w {w_DU.shape} differ in D")
    if weights_BT is None:
        weights_BT = jnp.ones((b, t), jnp.float32)
    weights_BT = weights_BT.astype(jnp.float32)
    lay = _layout(b, d, w_DU.shape[1], t)
    t_local = t // lay.length_shards  # each shard chunks its own part of T
    n = _num_chunks(t_local, max(1, min(t_local, chunk_tokens // (b // lay.token_shards))))
    if lay.length and t_local % n:  # padding at the end would not split over T: T whole
        lay = dataclasses.replace(lay, length=(), length_shards=1)
        n = _num_chunks(t, max(1, min(t, chunk_tokens // (b // lay.token_shards))))
    pad = n * -(-t // n) - t
    if pad:
        pad_BT = ((0, 0), (0, pad))
        x_BTD = jnp.pad(x_BTD, (*pad_BT, (0, 0)))
        targets_BT, weights_padded = jnp.pad(targets_BT, pad_BT), jnp.pad(weights_BT, pad_BT)
    else:
        weights_padded = weights_BT
    lay = dataclasses.replace(lay, chunks=n)
    loss = _fused_loss(lay, x_BTD, w_DU.astype(x_BTD.dtype), targets_BT.astype(jnp.int32),
                       weights_padded)
    return loss, jnp.sum(weights_BT)


def chunked_mtp_loss(
    mtp_x_IBTD: jax.Array,
    w_DU: jax.Array,
    tokens_BT: jax.Array,
    segment_ids_BT: jax.Array | None = None,
    weights_BT: jax.Array | None = None,
    *,
    chunk_tokens: int,
) -> jax.Array:
    """`mtp_loss` from each module's normed hidden states (mtp_x_IBTD, after that module's
    norm) and the shared head w_DU, with `chunked_cross_entropy`."""
    return mtp_mean(
        *chunked_mtp_loss_sums(
            mtp_x_IBTD, w_DU, tokens_BT, segment_ids_BT, weights_BT, chunk_tokens=chunk_tokens
        )
    )


def chunked_mtp_loss_sums(
    mtp_x_IBTD: jax.Array,
    w_DU: jax.Array,
    tokens_BT: jax.Array,
    segment_ids_BT: jax.Array | None = None,
    weights_BT: jax.Array | None = None,
    *,
    chunk_tokens: int,
) -> tuple[jax.Array, jax.Array]:
    """`mtp_loss_sums` with `chunked_cross_entropy` (the arguments of `chunked_mtp_loss`)."""
    sums, counts = [], []
    for k in range(1, mtp_x_IBTD.shape[0] + 1):
        targets_BT, valid_BT = mtp_targets(tokens_BT, k, segment_ids_BT, weights_BT)
        loss_sum, count = chunked_cross_entropy(
            mtp_x_IBTD[k - 1], w_DU, targets_BT, valid_BT, chunk_tokens=chunk_tokens
        )
        sums.append(loss_sum)
        counts.append(count)
    return jnp.stack(sums), jnp.stack(counts)
