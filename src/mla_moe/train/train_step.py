"""The pure training and evaluation steps, and the train state they carry.

Train state (a plain dict, every leaf a jax.Array):
  step       int32 scalar, completed optimizer steps
  params     nnx.State of the model's `nnx.Param`s (float32 master weights)
  extra      nnx.State of everything else (the routers' expert biases)
  opt_state  the optax state

Batch (global arrays, [B, T]): inputs, targets, positions, segment_ids (int32), weights (f32).

Loss = CE (token mean over the whole global batch) + MoE aux losses (already weighted by their
coefficients in the model) + mtp_loss_weight * MTP loss. With `loss_chunk_tokens` > 0 the CE
and MTP losses apply the head a chunk of tokens at a time (`losses.chunked_cross_entropy`): the
[tokens, vocab] logits are never whole in memory; the loss is the same up to float rounding.
With gradient accumulation the batch is split into A micro-batches run one after another
(lax.scan). Each loss is a sum over the micro-batches divided once by the whole batch's count
(CE: the target weight; MTP: each module's valid targets; the balance and z losses and the
indexer's KL: the sequences, T tokens each), so loss and gradient equal the unsplit batch's; the
exception, the balance losses with seq_aux=False, is in train/config.py (grad_accum_steps). The
expert-bias update uses the token counts summed over all micro-batches and is applied after the
optimizer step.

V3.2 (`dsa_stage`, dsa_loss.py): "sparse" adds indexer_loss_coef x the indexer's KL, whose
gradient reaches the indexers only (their inputs are detached, the top-k is discrete); in
"warmup" that KL is the whole differentiated loss (the optimizer freezes everything else, so the
backward runs through the indexers alone) and the CE is only reported.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mla_moe import context_parallel, losses, sharding
from mla_moe.config import ModelConfig
from mla_moe.decoder import DeepSeekModel
from mla_moe.router import ExpertBias
from mla_moe.train.expert_bias import apply_expert_bias_update


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static settings of the jitted step."""

    grad_accum_steps: int = 1
    loss_chunk_tokens: int = 0  # > 0: chunked CE over about this many tokens per device
    dsa_stage: str = "off"  # V3.2: "off", "warmup" or "sparse" (train.dsa_stage)
    indexer_loss_coef: float = 1.0


def abstract_model(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, abstract params, abstract extra) without allocating anything."""
    model = sharding.abstract_model(lambda: DeepSeekModel(cfg, rngs=nnx.Rngs(params=0)))
    return nnx.split(model, nnx.Param, ...)


BATCH_FIELDS = {
    "inputs": jnp.int32,
    "targets": jnp.int32,
    "positions": jnp.int32,
    "segment_ids": jnp.int32,
    "weights": jnp.float32,
}


def batch_spec(
    batch_size: int, seq_len: int, sharding: jax.sharding.Sharding | None = None
) -> dict[str, jax.ShapeDtypeStruct]:
    """The batch as ShapeDtypeStructs [batch_size, seq_len] (with `sharding`, e.g. over the
    batch axes): what the step compiles for, without reading any data."""
    return {
        k: jax.ShapeDtypeStruct((batch_size, seq_len), d, sharding=sharding)
        for k, d in BATCH_FIELDS.items()
    }


def make_init_fn(
    cfg: ModelConfig, tx: optax.GradientTransformation, seed: int
) -> Callable[[], dict[str, Any]]:
    """A function () -> train state; jit it with out_shardings for a sharded init."""

    def init():
        model = DeepSeekModel(cfg, rngs=nnx.Rngs(params=seed))
        _, params, extra = nnx.split(model, nnx.Param, ...)
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "extra": extra,
            "opt_state": tx.init(params),
        }

    return init


def _forward_losses(model: DeepSeekModel, batch, chunk_tokens: int, indexer_loss=False):
    """(model output, CE sum, weight sum, MTP (loss sums [I], target counts [I]) or None) of one
    batch; with chunk_tokens > 0 the head is applied inside the chunked losses and the output
    carries no logits."""
    chunked = chunk_tokens > 0
    out = model(
        batch["inputs"],
        positions_BT=batch["positions"],
        segment_ids_BT=batch["segment_ids"],
        logits=not chunked,
        indexer_loss=indexer_loss,
    )
    if chunked:
        w_DU = model.head_weight()
        ce_sum, weight_sum = losses.chunked_cross_entropy(
            out.normed_hidden, w_DU, batch["targets"], batch["weights"], chunk_tokens=chunk_tokens
        )
        mtp = None
        if out.mtp_normed_hidden is not None:
            tokens, segments = batch["inputs"], batch["segment_ids"]
            mtp = losses.chunked_mtp_loss_sums(
                out.mtp_normed_hidden, w_DU, tokens, segments, chunk_tokens=chunk_tokens
            )
    else:
        ce_sum, weight_sum = losses.cross_entropy(out.logits, batch["targets"], batch["weights"])
        mtp = None
        if out.mtp_logits is not None:
            mtp = losses.mtp_loss_sums(out.mtp_logits, batch["inputs"], batch["segment_ids"])
    return out, ce_sum, weight_sum, mtp


def _batch_counts(batch, cfg: ModelConfig) -> dict[str, Any]:
    """The denominators of the step's losses over the whole batch, known before any micro-batch
    runs: the CE's target weight, each MTP module's valid targets (as `losses.mtp_loss_sums`
    counts them; at least 1), and the number of sequences (static)."""
    inputs, segments = batch["inputs"], batch["segment_ids"]
    mtp = [
        jnp.sum(losses.mtp_targets(inputs, k, segments)[1], dtype=jnp.float32)
        for k in range(1, cfg.num_nextn_predict_layers + 1)
    ]
    return {
        "weight": jnp.maximum(jnp.sum(batch["weights"]), 1.0),
        "mtp": jnp.maximum(jnp.stack(mtp), 1.0) if mtp else jnp.ones((0,), jnp.float32),
        "sequences": inputs.shape[0],
    }


def _loss_fn(
    params,
    extra,
    batch,
    graphdef,
    cfg: ModelConfig,
    counts,
    chunk_tokens: int = 0,
    dsa_stage: str = "off",
    indexer_loss_coef: float = 1.0,
):
    """(this micro-batch's part of the batch's loss, its sums): every term is the micro-batch's
    sum over its tokens (or sequences) divided by the whole batch's count (`_batch_counts`),
    so the parts of the micro-batches add up to the loss of the whole batch."""
    model = nnx.merge(graphdef, params, extra)
    out, ce_sum, weight_sum, mtp = _forward_losses(
        model, batch, chunk_tokens, indexer_loss=dsa_stage != "off"
    )
    if mtp is None:
        mtp = (jnp.zeros((0,), jnp.float32), jnp.zeros((0,), jnp.float32))
    mtp_sums, mtp_counts = mtp
    # The balance and z losses and the indexer's KL are means over this micro-batch's
    # sequences, or over all its tokens (T per sequence, whatever their weights): times its
    # share of the batch's sequences, each is its sum over the batch's count. With seq_aux=False
    # the balance losses' statistics are the micro-batch's (train/config.py, grad_accum_steps).
    seqs = batch["inputs"].shape[0]
    share = seqs / counts["sequences"]
    kl = jnp.zeros((), jnp.float32) if out.indexer_loss is None else out.indexer_loss
    if dsa_stage == "warmup":
        loss = share * indexer_loss_coef * kl
    else:
        mtp_part = jnp.sum(mtp_sums / counts["mtp"]) / max(mtp_sums.shape[0], 1)
        loss = (
            ce_sum / counts["weight"]
            + cfg.mtp_loss_weight * mtp_part
            + share * (out.aux_loss + indexer_loss_coef * kl)
        )
    by_seqs = lambda x: seqs * x  # noqa: E731  (a per-sequence or per-token mean -> a sum)
    sums = {
        "ce_sum": ce_sum,
        "weight_sum": weight_sum,
        "mtp_sums": mtp_sums,
        "mtp_counts": mtp_counts,
        "sequences": jnp.asarray(seqs, jnp.float32),
        "aux_loss": by_seqs(out.aux_loss),
        "aux_losses": {k: by_seqs(v) for k, v in out.aux_losses.items()},
        "indexer_loss": by_seqs(kl),
        "tokens_per_expert": tuple(r.tokens_per_expert for r in out.router),
        "dropped_fraction": tuple(by_seqs(r.dropped_fraction) for r in out.router),
    }
    return loss, sums


def _metrics_of_sums(sums) -> dict[str, Any]:
    """The logged losses from the sums of every micro-batch: each divided once by its count."""
    per_seq = lambda x: x / sums["sequences"]  # noqa: E731
    mtp = jnp.zeros((), jnp.float32)
    if sums["mtp_sums"].size:
        mtp = losses.mtp_mean(sums["mtp_sums"], sums["mtp_counts"])
    return {
        "ce_sum": sums["ce_sum"],
        "weight_sum": sums["weight_sum"],
        "aux_loss": per_seq(sums["aux_loss"]),
        "aux_losses": jax.tree.map(per_seq, sums["aux_losses"]),
        "mtp_loss": mtp,
        "indexer_loss": per_seq(sums["indexer_loss"]),
        "tokens_per_expert": sums["tokens_per_expert"],
        "dropped_fraction": jax.tree.map(per_seq, sums["dropped_fraction"]),
    }


def _grads_and_aux(params, extra, batch, graphdef, cfg, step_cfg: StepConfig):
    """(loss, metrics of its parts, gradients) of the whole batch, run as
    `step_cfg.grad_accum_steps` micro-batches one after another (lax.scan): the losses' and
    gradients' sums are added over micro-batches, each loss divided once by the whole batch's
    count. On a mesh with `context` > 1 the batch is first put in the zigzag layout
    (context_parallel.py)."""
    batch = context_parallel.zigzag_batch(batch, context_parallel.context_size())
    counts = _batch_counts(batch, cfg)
    grad_fn = functools.partial(
        jax.value_and_grad(_loss_fn, has_aux=True),
        chunk_tokens=step_cfg.loss_chunk_tokens,
        dsa_stage=step_cfg.dsa_stage,
        indexer_loss_coef=step_cfg.indexer_loss_coef,
    )
    a = step_cfg.grad_accum_steps
    if a == 1:
        (loss, sums), grads = grad_fn(params, extra, batch, graphdef, cfg, counts)
        return loss, _metrics_of_sums(sums), grads

    micro = jax.tree.map(lambda x: x.reshape(a, x.shape[0] // a, *x.shape[1:]), batch)

    def body(carry, mb):
        (loss, sums), grads = grad_fn(params, extra, mb, graphdef, cfg, counts)
        return jax.tree.map(jnp.add, carry, (loss, sums, grads)), None

    zero = jax.eval_shape(
        lambda: grad_fn(params, extra, jax.tree.map(lambda x: x[0], micro), graphdef, cfg, counts)
    )
    zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (zero[0][0], zero[0][1], zero[1]))
    (loss, sums, grads), _ = jax.lax.scan(body, zero, micro)
    return loss, _metrics_of_sums(sums), grads


def _global_norm(tree) -> jax.Array:
    tree_lib = getattr(optax, "tree", None)
    if tree_lib is not None and hasattr(tree_lib, "norm"):
        return tree_lib.norm(tree)
    return optax.global_norm(tree)


def train_step(
    state: dict[str, Any],
    batch: dict[str, jax.Array],
    fault_step: Any = -1,
    *,
    graphdef: nnx.GraphDef,
    cfg: ModelConfig,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    step_cfg: StepConfig,
) -> tuple[dict[str, Any], dict[str, jax.Array]]:
    """One optimizer step. Returns (new state, metrics dict of scalars / small vectors).

    `fault_step` (a traced int, -1 = off) poisons that step's loss with NaN: the fault-handling
    tests use it without compiling a second step function.
    """
    params, extra = state["params"], state["extra"]
    loss, aux, grads = _grads_and_aux(params, extra, batch, graphdef, cfg, step_cfg)
    step = state["step"] + 1
    loss = jnp.where(step == fault_step, jnp.nan, loss)
    grad_norm = _global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)

    new_extra = extra
    if cfg.expert_bias_update_rate > 0 and aux["tokens_per_expert"]:
        model = nnx.merge(graphdef, new_params, extra)
        apply_expert_bias_update(model, aux["tokens_per_expert"], cfg.expert_bias_update_rate)
        _, _, new_extra = nnx.split(model, nnx.Param, ...)

    # A non-finite step leaves the state as it was (only the step counter moves), whether the
    # host then skips it or stops.
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    new_state = {
        "step": step,
        "params": keep(new_params, params),
        "extra": keep(new_extra, extra),
        "opt_state": keep(opt_state, state["opt_state"]),
    }
    metrics = {
        "loss": aux["ce_sum"] / jnp.maximum(aux["weight_sum"], 1.0),
        "total_loss": loss,
        "aux_loss": aux["aux_loss"],
        "mtp_loss": aux["mtp_loss"],
        **({"indexer_loss": aux["indexer_loss"]} if step_cfg.dsa_stage != "off" else {}),
        "grad_norm": grad_norm,
        "lr": schedule(state["step"]),
        "finite": finite,
        "target_tokens": aux["weight_sum"],
        **{f"aux/{k}": v for k, v in aux["aux_losses"].items()},
    }
    if aux["tokens_per_expert"]:
        counts = jnp.stack(aux["tokens_per_expert"])  # [MoE layers, E]
        metrics["expert_load_max"] = counts.max(-1)
        metrics["expert_load_mean"] = counts.mean(-1)
        metrics["drop_fraction"] = jnp.stack(aux["dropped_fraction"])
        biases = [
            v[...] for path, v in nnx.to_flat_state(new_state["extra"]) if isinstance(v, ExpertBias)
        ]
        if biases:
            metrics["bias_min"] = jnp.min(jnp.stack([b.min() for b in biases]))
            metrics["bias_max"] = jnp.max(jnp.stack([b.max() for b in biases]))
    return new_state, metrics


def eval_step(
    state: dict[str, Any],
    batch: dict[str, jax.Array],
    *,
    graphdef: nnx.GraphDef,
    loss_chunk_tokens: int = 0,
) -> dict[str, Any]:
    """Sums of token losses and weights (next-token CE only) over one batch."""
    model = nnx.merge(graphdef, state["params"], state["extra"])
    batch = context_parallel.zigzag_batch(batch, context_parallel.context_size())
    _, ce_sum, weight_sum, _ = _forward_losses(model, batch, loss_chunk_tokens)
    return {"ce_sum": ce_sum, "weight_sum": weight_sum}
