"""AdamW with linear warmup + cosine decay, global-norm clipping, and no decay on vectors.

Weight decay applies to weight matrices only: norm scales and biases are left alone, as in
GPT-2/DeepSeek practice. They are found by name, not rank, because scanned layer groups stack
a norm's [D] scale into [L, D].

Both Adam moments are stored in `train.moment_dtype` ("float32" or "bfloat16": half the
optimizer memory). The update itself always runs in float32: the stored moments are upcast,
updated and rounded (to nearest) back to the storage dtype. `bench/tiny_runs.py` compares
the two on the tiny preset.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import optax

if TYPE_CHECKING:
    import ml_collections


def learning_rate_schedule(train_cfg: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate`, then cosine down to `min_lr_ratio` of it."""
    steps = int(train_cfg.steps)
    warmup = int(train_cfg.warmup_steps)
    decay = int(train_cfg.get("decay_steps") or steps)
    peak = float(train_cfg.learning_rate)
    if warmup >= decay:
        # A run shorter than its warmup: warm up over the whole run, then hold.
        return optax.linear_schedule(0.0, peak, max(decay, 1))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup, decay_steps=decay,
        end_value=peak * float(train_cfg.min_lr_ratio),
    )


def _no_decay(path) -> bool:
    names = [str(getattr(e, "key", getattr(e, "name", ""))).lower() for e in path]
    return any("norm" in n or n == "bias" or n.endswith("_bias") for n in names)


def decay_mask(params: Any) -> Any:
    """True for the leaves that get weight decay: not norms or biases, and at least 2-D (a
    tree of bools shaped like the `params` tree of arrays)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: p.ndim >= 2 and not _no_decay(path), params
    )


MOMENT_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _cast_moments(state: optax.ScaleByAdamState, dtype) -> optax.ScaleByAdamState:
    cast = lambda tree: jax.tree.map(lambda x: x.astype(dtype), tree)  # noqa: E731
    return state._replace(mu=cast(state.mu), nu=cast(state.nu))


def scale_by_adam_stored_as(dtype, *, b1: float, b2: float, eps: float
                            ) -> optax.GradientTransformation:
    """`optax.scale_by_adam` whose state keeps both moments (mu, nu) in `dtype` while the
    update runs in float32; the state is the same `ScaleByAdamState`, so checkpoints and
    shardings see the same tree. (optax's own `mu_dtype` covers mu only, and computes
    `b1 * mu` in mu's dtype.)"""
    adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
    if jnp.dtype(dtype) == jnp.float32:
        return adam

    def init(params):
        return _cast_moments(adam.init(params), dtype)

    def update(updates, state, params=None):
        updates, state = adam.update(updates, _cast_moments(state, jnp.float32), params)
        return updates, _cast_moments(state, dtype)

    return optax.GradientTransformation(init, update)


def trains_in_warmup(path) -> bool:
    """Whether a parameter trains in the V3.2 dense warm-up: the indexers' weights only."""
    return any(str(getattr(e, "key", getattr(e, "name", ""))) == "indexer" for e in path)


def _freeze_all_but_indexers(tx: optax.GradientTransformation
                             ) -> optax.GradientTransformation:
    """`tx` on the indexers' weights; no update, and no optimizer state, for the rest."""
    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "train" if trains_in_warmup(path) else "frozen", params)

    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def make_optimizer(train_cfg: ml_collections.ConfigDict
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(AdamW chained after global-norm clipping when `grad_clip_norm` > 0, the learning-rate
    schedule) from the training settings (the run config's `train` section). In the V3.2
    dense warm-up (`dsa_stage="warmup"`) only the indexers' weights are optimised."""
    schedule = learning_rate_schedule(train_cfg)
    parts = []
    if train_cfg.grad_clip_norm and train_cfg.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(float(train_cfg.grad_clip_norm)))
    moment_dtype = MOMENT_DTYPES[train_cfg.get("moment_dtype", "float32")]
    # optax.adamw's own chain, with the moments' storage dtype chosen.
    parts.append(optax.chain(
        scale_by_adam_stored_as(moment_dtype, b1=float(train_cfg.b1), b2=float(train_cfg.b2),
                                eps=float(train_cfg.eps)),
        optax.add_decayed_weights(float(train_cfg.weight_decay), decay_mask),
        optax.scale_by_learning_rate(schedule),
    ))
    tx = optax.chain(*parts)
    if train_cfg.get("dsa_stage", "off") == "warmup":
        tx = _freeze_all_but_indexers(tx)
    return tx, schedule
