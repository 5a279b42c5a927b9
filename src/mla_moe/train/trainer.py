"""The training loop: `train(config, workdir)` is the whole job.

`launch/train.py` only parses flags and calls it. Every check that can fail on bad input
(config values, data, mesh, batch split, an incompatible workdir) runs before anything is
compiled. The parts live beside this file: `setup` (mesh, data, optimizer, jitted steps),
`resume` (the workdir: checks, restore or start), `preemption` (signals) and `loop` (profiling,
the non-finite policy, the logged record).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import numpy as np

from mla_moe import paths, sharding
from mla_moe.data import global_batch
from mla_moe.train import compilation_cache, loop, preemption, resume, setup
from mla_moe.train import config as config_lib
from mla_moe.train.loop import NonFiniteLossError, parse_profile_steps
from mla_moe.train.resume import IncompatibleWorkdirError
from mla_moe.train.setup import Built, build, optimizer_key, run_mesh

if TYPE_CHECKING:
    import ml_collections

__all__ = [
    "Built",
    "IncompatibleWorkdirError",
    "NonFiniteLossError",
    "TrainResult",
    "build",
    "optimizer_key",
    "parse_profile_steps",
    "run_mesh",
    "train",
]


@dataclasses.dataclass
class TrainResult:
    """How a `train` call ended."""

    step: int  # completed steps
    resumed_from: int | None
    preempted: bool
    last_record: dict | None


def train(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    profile_steps: str = "",
    init_from_hf: str = "",
    hooks: tuple[Callable[[int, dict], None], ...] = (),
) -> TrainResult:
    """Trains until `config.train.steps`, resuming from the workdir's latest checkpoint."""
    # Everything traced below (init, step, eval) sees the mesh and the logical rules.
    with run_mesh(config) as (cfg, mesh):
        compilation_cache.disable_where_unsafe(mesh.devices.size)
        return _train(
            config,
            cfg,
            mesh,
            workdir,
            profile_steps=profile_steps,
            init_from_hf=init_from_hf,
            hooks=hooks,
        )


def _train(config, cfg, mesh, workdir, *, profile_steps, init_from_hf, hooks) -> TrainResult:
    t = config.train
    profile = parse_profile_steps(profile_steps)
    workdir = paths.resolve(workdir)
    is_main = jax.process_index() == 0
    data, built, run = _start(config, cfg, mesh, workdir, init_from_hf, is_main)
    state, ckpt, writer = run.state, run.ckpt, run.writer
    step = int(jax.device_get(state["step"]))
    fault_step = np.int32(t.fault_nan_step)
    step_fn, eval_fn = setup.jitted_steps(built, state, data, fault_step)
    evaluate = loop.evaluator(eval_fn, data, built.batch_sh)
    resumed = run.resumed_from is not None
    reporter = loop.Reporter(config, cfg, mesh, writer, evaluate, resumed=resumed, is_main=is_main)
    if is_main:
        loop.print_summary(cfg, mesh, config, data, reporter)

    profiler = loop.ProfileWindow(profile if is_main else None, str(workdir / "profile"))
    preempted, record = False, None
    try:
        with preemption.StopSignal() as stop:
            while step < t.steps:
                profiler.before_step(step)
                batch = global_batch(next(data.iterator), built.batch_sh)
                t0 = time.perf_counter()
                state, metrics = step_fn(state, batch, fault_step)
                metrics = jax.device_get(metrics)
                dt = time.perf_counter() - t0
                step += 1
                profiler.after_step(step)
                loop.check_finite(metrics, step, t.nan_policy, ckpt)
                reporter.time(step, dt)
                last = step == t.steps
                if step % config.log.every_steps == 0 or last:
                    record = reporter.write(step, metrics, state, last)
                for hook in hooks:
                    hook(step, metrics)
                stopping = preemption.stop_requested(stop.received is not None)
                if stopping or last or step % config.checkpoint.every_steps == 0:
                    ckpt.save(step, state, data.iterator, force=True)
                    if is_main:
                        print(f"saved checkpoint step {step}", flush=True)
                if stopping:
                    preempted = True
                    print(f"stopping at step {step} on a signal; run again to resume", flush=True)
                    break
    finally:
        profiler.close()
        ckpt.close()  # waits for the async save in flight
        writer.close()
    return TrainResult(
        step=step, resumed_from=run.resumed_from, preempted=preempted, last_record=record
    )


def _start(config, cfg, mesh, workdir, init_from_hf: str, is_main: bool):
    """(data, built, opened workdir): every check that needs no compilation first, then the
    state restored from the workdir or initialised (from HF weights with `init_from_hf`)."""
    resume.check_workdir(workdir, config)
    config_lib.check_batch(config, sharding.data_parallel_size(mesh), jax.process_count())
    data = setup.open_data(config, cfg)
    built = build(config, mesh, cfg)
    init_state = built.init_fn
    if init_from_hf:
        init_state = functools.partial(setup.init_from_hf, init_from_hf, cfg, built)
    run = resume.open_workdir(
        workdir,
        config,
        built,
        data.iterator,
        init_state,
        read_first=bool(init_from_hf),
        is_main=is_main,
    )
    return data, built, run
