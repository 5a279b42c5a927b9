"""Benchmark helpers: time the real train step (the trainer's jitted step, optimizer included)
and a large matmul in the same process, per docs PERF.md."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import jax
import numpy as np

import mla_moe
from mla_moe import sharding
from mla_moe.data import global_batch
from mla_moe.train import config as config_lib
from mla_moe.train import metrics, trainer

if TYPE_CHECKING:
    import ml_collections


def matmul_flops(n: int, dtype: jax.typing.DTypeLike, repeats: int = 5) -> float:
    """Median FLOP/s of an n x n x n matmul on the default device (fresh random inputs)."""
    return metrics.measure_matmul_flops(n, repeats, dtype)


def time_train_step(config: ml_collections.ConfigDict, steps: int = 3) -> dict:
    """Median step time of `config`'s train step on all local devices; random tokens."""
    with trainer.run_mesh(config) as (cfg, mesh):
        config_lib.check_batch(config, sharding.data_parallel_size(mesh), 1)
        return _time(cfg, config, mesh, steps)


def random_batch(rng: np.random.Generator, vocab_size: int, config: ml_collections.ConfigDict,
                 batch_sh) -> dict:
    """One global batch of `config.train`'s shape: random tokens, one document per row,
    placed with the train step's batch shardings `batch_sh`."""
    t = config.train
    tok = rng.integers(0, vocab_size, (t.batch_size, t.seq_len + 1), dtype=np.int32)
    b = {"inputs": tok[:, :-1], "targets": tok[:, 1:],
         "positions": np.broadcast_to(np.arange(t.seq_len, dtype=np.int32), tok[:, 1:].shape),
         "segment_ids": np.ones_like(tok[:, 1:]),
         "weights": np.ones(tok[:, 1:].shape, np.float32)}
    return global_batch(b, batch_sh)


def _time(cfg, config, mesh, steps):
    t = config.train
    built = trainer.build(config, mesh)
    state = built.init_fn()
    rng = np.random.default_rng(0)

    def batch():
        return random_batch(rng, cfg.vocab_size, config, built.batch_sh)

    t0 = time.perf_counter()
    state, m = built.step_fn(state, batch(), np.int32(-1))
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        b = batch()
        t0 = time.perf_counter()
        state, m = built.step_fn(state, b, np.int32(-1))
        jax.block_until_ready((state, m))
        times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))
    tokens = t.batch_size * t.seq_len
    flops = mla_moe.flops_per_token(cfg, t.seq_len) * tokens
    total, active = mla_moe.param_count(cfg)
    return dict(step_s=step_s, tokens_per_s=tokens / step_s, flops_per_s=flops / step_s,
                compile_s=compile_s, params=total, active=active, loss=float(m["loss"]),
                step_times_s=times)
