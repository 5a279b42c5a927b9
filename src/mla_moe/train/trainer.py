"""The training loop: `train(config, workdir)` is the whole job.

`launch/train.py` only parses flags, calls it and exits with its `exit_status`. Every check that
can fail on bad input (config values, data, mesh, batch split, an incompatible workdir) runs
before anything is compiled. The parts live beside this file: `setup` (mesh, data, optimizer,
jitted steps), `resume` (the workdir: checks, the schedule of a continued run, restore or
start), `preemption` (signals and exit statuses) and `loop` (profiling, the non-finite policy,
the logged record).
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
    preempted: bool  # stopped on a signal (after saving what it trained)
    last_record: dict | None
    stop_signal: int | None = None  # the signal it stopped on, whichever process received it

    @property
    def exit_status(self) -> int:
        """The launcher's exit status: 0, or 128 + the signal's number for a stopped run."""
        return preemption.exit_status(self.stop_signal)


def train(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    profile_steps: str = "",
    init_from_hf: str = "",
    hooks: tuple[Callable[[int, dict], None], ...] = (),
) -> TrainResult:
    """Trains until `config.train.steps`, resuming from the workdir's latest checkpoint.

    SIGTERM or Ctrl-C stops the run after its step with a checkpoint (`preemption`); a run
    already at `train.steps` only says so."""
    started = time.time()
    # Everything traced below (init, step, eval) sees the mesh and the logical rules.
    with preemption.StopSignal() as stop, run_mesh(config) as (cfg, mesh):
        compilation_cache.disable_where_unsafe(mesh.devices.size)
        return _train(
            config,
            cfg,
            mesh,
            workdir,
            stop,
            started=started,
            profile_steps=profile_steps,
            init_from_hf=init_from_hf,
            hooks=hooks,
        )


def _train(config, cfg, mesh, workdir, stop, *, started, profile_steps, init_from_hf, hooks
           ) -> TrainResult:
    profile = parse_profile_steps(profile_steps)
    workdir = paths.resolve(workdir)
    is_main = jax.process_index() == 0
    config, latest = resume.plan(workdir, config, is_main=is_main)
    t = config.train
    if latest is not None and latest >= t.steps:
        if is_main:
            print(f"already at step {latest}; pass --config.train.steps=M (M > {latest}) to "
                  "continue", flush=True)
        return TrainResult(step=latest, resumed_from=latest, preempted=False, last_record=None)
    data, built, run = _start(config, cfg, mesh, workdir, init_from_hf, is_main)
    state, ckpt, writer = run.state, run.ckpt, run.writer
    stop.checkpointer = ckpt
    step = int(jax.device_get(state["step"]))
    fault_step = np.int32(t.fault_nan_step)
    resumed = run.resumed_from is not None
    reporter = loop.Reporter(config, cfg, mesh, writer, None, resumed=resumed,
                             is_main=is_main, started=started)
    if is_main:
        loop.print_summary(cfg, mesh, config, data, reporter)
    step_fn, eval_fn = setup.jitted_steps(built, state, data, fault_step, t, verbose=is_main)
    reporter.evaluate = loop.evaluator(eval_fn, data, built.batch_sh)

    profiler = loop.ProfileWindow(profile if is_main else None, str(workdir / "profile"))
    record = None
    try:
        signum = preemption.stop_signal(stop.received)  # one during setup: no step to save
        while signum is None and step < t.steps:
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
            signum = preemption.stop_signal(stop.received)
            if signum is not None:
                ckpt.wait()  # a Ctrl-C meanwhile (stop.hurry) asks for no further save
            # A save is collective: one process's second Ctrl-C cannot skip it for all.
            hurry = stop.hurry and jax.process_count() == 1
            if (signum is not None and not hurry) or (
                signum is None and (last or step % config.checkpoint.every_steps == 0)
            ):
                ckpt.save(step, state, data.iterator, force=True)
            _report_saves(ckpt, is_main)
    finally:
        profiler.close()
        ckpt.close()  # waits for the async save in flight
        writer.close()
    _report_saves(ckpt, is_main)
    if signum is not None and is_main:
        then = (f"resumes from checkpoint step {ckpt.committed}" if ckpt.committed is not None
                else "starts over (nothing was saved)")
        print(f"stopped at step {step} on {preemption.NAMES[signum]} (exit status "
              f"{preemption.exit_status(signum)}); the same command {then}", flush=True)
    return TrainResult(step=step, resumed_from=run.resumed_from, preempted=signum is not None,
                       last_record=record, stop_signal=signum)


def _report_saves(ckpt, is_main: bool) -> None:
    """One line per save that has completed since the last call (a save is asynchronous: it
    is reported once it is complete, never when it starts)."""
    for done in ckpt.completed():
        if is_main:
            print(f"saved checkpoint step {done}", flush=True)


def _start(config, cfg, mesh, workdir, init_from_hf: str, is_main: bool):
    """(data, built, opened workdir): every check that needs no compilation first (the
    workdir's was `resume.plan`'s), then the state restored from the workdir or initialised
    (from HF weights with `init_from_hf`)."""
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
