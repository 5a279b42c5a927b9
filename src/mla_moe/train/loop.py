"""What the training loop does around each step: the profiler window, the non-finite policy,
and the logged record (perplexity, step time, throughput, MFU, validation loss)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import numpy as np

import mla_moe
from mla_moe.data import global_batch
from mla_moe.train import metrics as metrics_lib
from mla_moe.train.config import ConfigError

if TYPE_CHECKING:
    import ml_collections

    from mla_moe.config import ModelConfig
    from mla_moe.train.checkpoint import Checkpointer
    from mla_moe.train.setup import RunData


class NonFiniteLossError(FloatingPointError):
    """A step produced a NaN/Inf loss or gradient and train.nan_policy is "stop"."""


def parse_profile_steps(spec: str) -> tuple[int, int] | None:
    """`--profile_steps=A:B` as (A, B), steps A to B traced; None for ''."""
    if not spec:
        return None
    try:
        a, b = (int(x) for x in spec.split(":"))
    except ValueError:
        raise ConfigError(f"--profile_steps must look like A:B, got {spec!r}") from None
    if not 0 < a <= b:
        raise ConfigError(f"--profile_steps needs 0 < A <= B, got {spec!r}")
    return a, b


class ProfileWindow:
    """A jax.profiler trace of steps A..B (`steps`; None: none) into `directory`."""

    def __init__(self, steps: tuple[int, int] | None, directory: str):
        self._steps, self._directory = steps, directory
        self._tracing = False

    def before_step(self, done: int) -> None:
        """`done`: the steps completed so far."""
        if self._steps and done + 1 == self._steps[0]:
            jax.profiler.start_trace(self._directory)
            self._tracing = True

    def after_step(self, done: int) -> None:
        if self._tracing and done == self._steps[1]:
            self.close()

    def close(self) -> None:
        if self._tracing:
            jax.profiler.stop_trace()
            self._tracing = False


def check_finite(metrics: dict, step: int, nan_policy: str, ckpt: Checkpointer) -> None:
    """Stops (train.nan_policy="stop") or reports a skipped step whose loss or gradient is not
    finite; the step itself has left the state as it was."""
    if metrics["finite"]:
        return
    msg = (
        f"step {step}: non-finite loss ({metrics['total_loss']}) or gradient "
        f"norm ({metrics['grad_norm']})"
    )
    if nan_policy == "stop":
        raise NonFiniteLossError(
            f"{msg}; stopping. Checkpoints are untouched (latest: step {ckpt.latest_step()})"
        )
    print(f"{msg}; skipped (train.nan_policy=skip)", flush=True)


class Reporter:
    """The logged record of a step: its metrics, perplexity, the mean step time, throughput
    and MFU since the last record, and the validation loss when it is due. The console line
    adds the time since `started` (time.time() when the run began) and an ETA: the steps left
    at the wall-clock pace of this process's steps so far (evaluations and saves included)."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        cfg: ModelConfig,
        mesh: jax.sharding.Mesh,
        writer: metrics_lib.MetricWriter,
        evaluate: Callable[[dict], float] | None,
        *,
        resumed: bool,
        is_main: bool,
        started: float | None = None,
    ):
        t = self._train = config.train
        self._flops_per_step = mla_moe.flops_per_token(cfg, t.seq_len) * t.batch_size * t.seq_len
        self.peak, self.peak_source = metrics_lib.peak_flops_per_device(
            config.log.peak_tflops, mesh.devices.flat[0]
        )
        self._peak_total = self.peak * mesh.size
        self._writer, self.evaluate = writer, evaluate
        self._resumed, self._is_main = resumed, is_main
        self._window_time, self._window_steps = 0.0, 0
        self._started = time.time() if started is None else started
        self._pace_from: tuple[int, float] | None = None  # (step, time) the ETA counts from

    def time(self, step: int, seconds: float) -> None:
        """Counts `seconds` of step `step` (the first step of a fresh process warms up: not
        counted)."""
        if self._pace_from is None:
            self._pace_from = (step, time.time())
        if step > 1 or self._resumed:
            self._window_time += seconds
            self._window_steps += 1

    def write(self, step: int, metrics: dict, state: dict, last: bool) -> dict:
        """Writes (and on process 0 prints) step `step`'s record; returns it."""
        t = self._train
        m = dict(metrics)
        m["ppl"] = math.exp(min(m["loss"], 50.0))
        if self._window_steps:
            st = self._window_time / self._window_steps
            m["step_time_s"] = st
            m["tokens_per_s"] = t.batch_size * t.seq_len / st
            m["mfu"] = self._flops_per_step / st / self._peak_total
        self._window_time, self._window_steps = 0.0, 0
        if self.evaluate and ((t.eval_every_steps and step % t.eval_every_steps == 0) or last):
            m["val_loss"] = self.evaluate(state)
        record = self._writer.write(step, m)
        if self._is_main:
            now, eta = time.time(), None
            if self._pace_from is not None and self._pace_from[0] < step < t.steps:
                pace = (now - self._pace_from[1]) / (step - self._pace_from[0])
                eta = pace * (t.steps - step)
            print(metrics_lib.progress_line(record, t.steps, now - self._started, eta),
                  flush=True)
        return record


def evaluator(eval_fn: Callable, data: RunData, batch_sh) -> Callable[[dict], float] | None:
    """state -> mean validation loss over `data.val` (None without validation batches)."""
    if not data.val:
        return None

    def evaluate(state) -> float:
        sums = np.zeros(2)
        for b in data.val:
            out = jax.device_get(eval_fn(state, global_batch(b, batch_sh)))
            sums += (out["ce_sum"], out["weight_sum"])
        return float(sums[0] / max(sums[1], 1.0))

    return evaluate


def print_summary(
    cfg: ModelConfig, mesh: jax.sharding.Mesh, config, data: RunData, reporter: Reporter
) -> None:
    """One line: model size, mesh, batch, data and the peak FLOP/s that MFU is measured
    against."""
    t = config.train
    total, active = mla_moe.param_count(cfg)
    entropy = data.train.unigram_entropy()
    print(
        f"model: {total / 1e6:.2f}M params ({active / 1e6:.2f}M active) | mesh "
        f"{dict(mesh.shape)} | batch {t.batch_size}x{t.seq_len} | data {data.path} "
        f"({data.train.num_tokens:,} tokens, unigram entropy {entropy:.3f} nats) | "
        f"peak {reporter.peak / 1e12:.3g} TFLOP/s/device ({reporter.peak_source})",
        flush=True,
    )
