"""The training loop: setup, resume, steps, logging, evaluation, checkpoints, faults.

`train(config, workdir)` is the whole job; `launch/train.py` only parses flags and calls it.
Every check that can fail on bad input (config values, data, mesh, batch split, an
incompatible workdir) runs before anything is compiled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from absl import logging
from flax import nnx

import mla_moe
from mla_moe import paths, sharding
from mla_moe.data import (
    PipelineConfig,
    TokenSplit,
    default_corpus,
    eval_batches,
    global_batch,
    train_iterator,
)
from mla_moe.errors import InputError, MissingInputError
from mla_moe.train import checkpoint as ckpt_lib
from mla_moe.train import compilation_cache
from mla_moe.train import config as config_lib
from mla_moe.train import metrics as metrics_lib
from mla_moe.train import optimizer as optimizer_lib
from mla_moe.train import train_step as step_lib
from mla_moe.train.config import ConfigError

if TYPE_CHECKING:
    import ml_collections

    from mla_moe.config import ModelConfig


class IncompatibleWorkdirError(InputError):
    """The workdir holds checkpoints of a run this config cannot continue."""


class NonFiniteLossError(FloatingPointError):
    """A step produced a NaN/Inf loss or gradient and train.nan_policy is "stop"."""


@dataclasses.dataclass
class TrainResult:
    """How a `train` call ended."""

    step: int  # completed steps
    resumed_from: int | None
    preempted: bool
    last_record: dict | None


def _config_json(config) -> dict:
    return json.loads(json.dumps(config.to_dict(), default=str))


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


class _StopSignal:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, saves and returns."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = {}
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _stop_requested(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def _check_workdir(workdir, config) -> None:
    """Refuses (before writing anything) a workdir that is not a directory we can write, or
    whose run this config cannot continue. `workdir`: an epath.Path (local or gs://)."""
    if workdir.exists() and not workdir.is_dir():
        raise InputError(f"--workdir={str(workdir)!r} is a file, not a directory; pass a new or "
                         "existing directory")
    if not paths.is_url(workdir):  # a bucket's permissions show at the first write
        parent = str(workdir)
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.access(parent, os.W_OK | os.X_OK):
            raise InputError(f"--workdir={str(workdir)!r}: {parent!r} is not writable; pass a "
                             "directory you can write to")
    path = workdir / "config.json"
    if not path.exists():
        return
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IncompatibleWorkdirError(
            f"{path} is not valid JSON ({e}); this is not a training workdir we wrote: use a "
            "new --workdir") from None
    diffs = config_lib.incompatible_fields(saved, _config_json(config))
    if diffs:
        raise IncompatibleWorkdirError(
            f"workdir {workdir!r} holds a run with a different config ({'; '.join(diffs)}); "
            "use a new --workdir, or the same settings to resume"
        )


def _check_checkpoint_shapes(ckpt: ckpt_lib.Checkpointer, step: int, abstract_state) -> None:
    saved = ckpt.saved_shapes(step)
    want = {k: tuple(v.shape) for k, v in ckpt_lib.flatten_state(abstract_state).items()}
    if saved != want:
        diff = sorted(set(saved) ^ set(want)) or [
            f"{k}: {saved[k]} vs {want[k]}" for k in sorted(want) if saved[k] != want[k]
        ]
        raise IncompatibleWorkdirError(
            f"checkpoint step {step} in {ckpt.directory!r} does not fit this model "
            f"(first differences: {diff[:3]}); use a new --workdir"
        )


def _resolve_data(config) -> str:
    path = config.data.path
    if not path:
        return default_corpus()
    if not paths.resolve(path).exists():
        raise MissingInputError(f"data.path={path!r} does not exist; pass a token store from "
                                "`python -m launch.prepare_data`, or '' for the default corpus")
    return path


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
        return _train(config, cfg, mesh, workdir, profile_steps=profile_steps,
                      init_from_hf=init_from_hf, hooks=hooks)


@contextlib.contextmanager
def run_mesh(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None
             ) -> Iterator[tuple[ModelConfig, jax.sharding.Mesh]]:
    """Validates `config`, builds its mesh over `devices` (default: all of this job's; or the
    compile-only devices of another machine) and activates it with the config's rules
    (`config.mesh.rules`). Yields (ModelConfig, mesh); fails before compiling on bad input."""
    cfg = config_lib.validate(config)
    try:
        mesh = sharding.make_mesh(config.mesh, devices, config=cfg)
    except ValueError as e:  # sizes that do not fit the devices or the model, naming the axis
        raise ConfigError(str(e)) from None
    rules = config.mesh.get("rules") if hasattr(config.mesh, "get") else None
    with sharding.use_mesh(mesh, rules.to_dict() if hasattr(rules, "to_dict") else rules):
        yield cfg, mesh


def _train(config, cfg, mesh, workdir, *, profile_steps, init_from_hf, hooks) -> TrainResult:
    # ---- checks that need no compilation -------------------------------------------------
    profile = parse_profile_steps(profile_steps)
    workdir = paths.resolve(workdir)
    _check_workdir(workdir, config)
    config_lib.check_batch(config, sharding.data_parallel_size(mesh), jax.process_count())
    data_path = _resolve_data(config)
    train_split = TokenSplit(data_path, "train")
    if train_split.vocab_size > cfg.vocab_size:
        raise ConfigError(
            f"data.path uses a vocabulary of {train_split.vocab_size} tokens but "
            f"model.vocab_size={cfg.vocab_size}"
        )
    t = config.train
    pipe = PipelineConfig(
        seq_len=t.seq_len, global_batch=t.batch_size, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
        num_threads=config.data.num_threads, prefetch=config.data.prefetch,
    )
    data_iter = train_iterator(train_split, pipe)  # raises if the data is too small
    val = []
    if t.eval_batches:
        val = eval_batches(TokenSplit(data_path, "val"), pipe, t.eval_batches)
    is_main = jax.process_index() == 0

    # ---- state: abstract, then restored or initialised ----------------------------------
    built = build(config, mesh)
    tx, abstract_state, state_sh, batch_sh = (
        built.tx, built.abstract_state, built.state_sh, built.batch_sh)
    target = built.state_spec()

    hf_state = None
    if init_from_hf and not (workdir / "checkpoints").is_dir():
        # A fresh run reads (and checks) the weights before anything is written.
        hf_state = _init_from_hf(init_from_hf, cfg, tx, abstract_state, state_sh)
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints", config.checkpoint)
    writer = metrics_lib.MetricWriter(workdir, is_main, config.log.tensorboard)
    latest = ckpt.latest_step()
    if latest is not None:
        _check_checkpoint_shapes(ckpt, latest, abstract_state)
        state = ckpt.restore(latest, target, data_iter)
        writer.truncate_after(latest)
        logging.info("resumed from checkpoint step %d", latest)
        print(f"resuming from step {latest} ({ckpt.directory})", flush=True)
    else:
        if hf_state is not None:
            state = hf_state
        elif init_from_hf:
            state = _init_from_hf(init_from_hf, cfg, tx, abstract_state, state_sh)
        else:
            state = built.init_fn()
        if is_main:
            (workdir / "config.json").write_text(json.dumps(_config_json(config), indent=2))
    step = int(jax.device_get(state["step"]))

    step_fn, eval_fn = built.step_fn, built.eval_fn
    fault_step = np.int32(t.fault_nan_step)
    if jax.process_count() > 1:
        # Gloo gives processes 30 s to meet at their first collective; compilation times can
        # differ by more on a loaded machine, so compile first, then meet at a barrier of the
        # coordination service (no collective), then warm up the stop-flag all-gather.
        import orbax.checkpoint as ocp

        probe = global_batch(next(train_iterator(train_split, pipe)), batch_sh)
        step_fn = step_fn.lower(state, probe, fault_step).compile()
        if val:
            eval_fn = eval_fn.lower(state, probe).compile()
        ocp.multihost.sync_global_processes("mla_moe_train_compiled", timeout=1800)
        _stop_requested(False)
    flops_per_step = mla_moe.flops_per_token(cfg, t.seq_len) * t.batch_size * t.seq_len
    peak, peak_source = metrics_lib.peak_flops_per_device(config.log.peak_tflops,
                                                          mesh.devices.flat[0])
    peak_total = peak * mesh.size
    total, active = mla_moe.param_count(cfg)
    if is_main:
        entropy = train_split.unigram_entropy()
        print(
            f"model: {total / 1e6:.2f}M params ({active / 1e6:.2f}M active) | mesh "
            f"{dict(mesh.shape)} | batch {t.batch_size}x{t.seq_len} | data {data_path} "
            f"({train_split.num_tokens:,} tokens, unigram entropy {entropy:.3f} nats) | "
            f"peak {peak / 1e12:.3g} TFLOP/s/device ({peak_source})",
            flush=True,
        )

    def evaluate() -> float:
        sums = np.zeros(2)
        for b in val:
            out = jax.device_get(eval_fn(state, global_batch(b, batch_sh)))
            sums += (out["ce_sum"], out["weight_sum"])
        return float(sums[0] / max(sums[1], 1.0))

    # ---- the loop ---------------------------------------------------------------------------
    resumed_from = latest
    preempted = False
    record = None
    window_time, window_steps = 0.0, 0
    profiling = False
    try:
        with _StopSignal() as stop:
            while step < t.steps:
                if profile and step + 1 == profile[0] and is_main:
                    jax.profiler.start_trace(str(workdir / "profile"))
                    profiling = True
                batch = global_batch(next(data_iter), batch_sh)
                t0 = time.perf_counter()
                state, metrics = step_fn(state, batch, fault_step)
                metrics = jax.device_get(metrics)
                dt = time.perf_counter() - t0
                step += 1
                if profiling and step == profile[1]:
                    jax.profiler.stop_trace()
                    profiling = False
                if not metrics["finite"]:
                    msg = (f"step {step}: non-finite loss ({metrics['total_loss']}) or gradient "
                           f"norm ({metrics['grad_norm']})")
                    if t.nan_policy == "stop":
                        raise NonFiniteLossError(
                            f"{msg}; stopping. Checkpoints are untouched (latest: step "
                            f"{ckpt.latest_step()})"
                        )
                    print(f"{msg}; skipped (train.nan_policy=skip)", flush=True)
                if step > 1 or resumed_from is not None:  # the first step includes compilation
                    window_time += dt
                    window_steps += 1
                last = step == t.steps
                if step % config.log.every_steps == 0 or last:
                    m = dict(metrics)
                    m["ppl"] = math.exp(min(m["loss"], 50.0))
                    if window_steps:
                        st = window_time / window_steps
                        m["step_time_s"] = st
                        m["tokens_per_s"] = t.batch_size * t.seq_len / st
                        m["mfu"] = flops_per_step / st / peak_total
                    window_time, window_steps = 0.0, 0
                    if val and ((t.eval_every_steps and step % t.eval_every_steps == 0) or last):
                        m["val_loss"] = evaluate()
                    record = writer.write(step, m)
                    if is_main:
                        print(metrics_lib.progress_line(record, t.steps), flush=True)
                for hook in hooks:
                    hook(step, metrics)
                stopping = _stop_requested(stop.received is not None)
                if stopping or last or step % config.checkpoint.every_steps == 0:
                    ckpt.save(step, state, data_iter, force=True)
                    if is_main:
                        print(f"saved checkpoint step {step}", flush=True)
                if stopping:
                    preempted = True
                    print(f"stopping at step {step} on a signal; run again to resume", flush=True)
                    break
    finally:
        if profiling:
            jax.profiler.stop_trace()
        ckpt.close()  # waits for the async save in flight
        writer.close()
    return TrainResult(step=step, resumed_from=resumed_from, preempted=preempted,
                       last_record=record)


def optimizer_key(train_cfg: ml_collections.ConfigDict) -> tuple:
    """The optimizer settings of `config.train` as a hashable tuple (the key of `build`)."""
    names = ("steps", "warmup_steps", "decay_steps", "learning_rate", "min_lr_ratio",
             "weight_decay", "b1", "b2", "eps", "grad_clip_norm", "moment_dtype", "dsa_stage")
    return tuple((n, train_cfg[n]) for n in names)


@dataclasses.dataclass(frozen=True)
class Built:
    """One run setup: optimizer, the state's abstract layout and shardings, jitted functions.

    Nothing here holds device memory: `init_fn` allocates the state only when called, and
    `step_fn` / `eval_fn` compile on first call or through `.lower(...).compile()`.
    """

    tx: object
    abstract_state: object
    state_sh: object
    batch_sh: object
    init_fn: Callable
    step_fn: Callable
    eval_fn: Callable

    def state_spec(self) -> Any:
        """The train state as ShapeDtypeStructs carrying the run's shardings."""
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            self.abstract_state, self.state_sh)

    def batch_spec(self, batch_size: int, seq_len: int) -> dict:
        """A global [batch_size, seq_len] batch as ShapeDtypeStructs over the batch axes."""
        return step_lib.batch_spec(batch_size, seq_len, self.batch_sh)


def build(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Built:
    """The run's optimizer, state layout and jitted step functions on `mesh`, used by `train`
    and by `launch.compile` alike. Reads no data, allocates nothing; call it inside
    `run_mesh(config, ...)` so that the rules in effect are the run's."""
    t = config.train
    return _build(config_lib.model_config(config), optimizer_key(t), config.seed, mesh,
                  t.grad_accum_steps, sharding.current_rules(), t.loss_chunk_tokens,
                  t.dsa_stage, float(t.indexer_loss_coef))


def _under_rules(fn: Callable, rules: sharding.Rules) -> Callable:
    """`fn` run (traced) under `rules`, whatever rules are in effect where it is called."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with sharding.use_rules(rules):
            return fn(*args, **kwargs)

    return wrapped


@functools.lru_cache(maxsize=4)
def _build(cfg, optimizer_key: tuple, seed: int, mesh, grad_accum_steps: int,
           rules: sharding.Rules, loss_chunk_tokens: int = 0, dsa_stage: str = "off",
           indexer_loss_coef: float = 1.0) -> Built:
    """`build`, cached so that runs of the same setup in one process (tests, benchmarks,
    restarts) trace and compile once. Everything in the result depends on the logical rules
    (the shardings, and the constraints traced into the steps), so they are part of the key
    and every function is traced under them."""
    import ml_collections

    tx, schedule = optimizer_lib.make_optimizer(ml_collections.ConfigDict(dict(optimizer_key)))
    graphdef, _, _ = step_lib.abstract_model(cfg)
    init = _under_rules(step_lib.make_init_fn(cfg, tx, seed), rules)
    abstract_state = jax.eval_shape(init)
    state_sh = sharding.state_shardings(abstract_state, mesh, rules)
    batch_sh = sharding.batch_sharding(mesh, rules)
    step_cfg = step_lib.StepConfig(grad_accum_steps=grad_accum_steps,
                                   loss_chunk_tokens=loss_chunk_tokens, dsa_stage=dsa_stage,
                                   indexer_loss_coef=indexer_loss_coef)
    train_step = functools.partial(step_lib.train_step, graphdef=graphdef, cfg=cfg, tx=tx,
                                   schedule=schedule, step_cfg=step_cfg)
    step_fn = jax.jit(_under_rules(train_step, rules), in_shardings=(state_sh, batch_sh, None),
                      out_shardings=(state_sh, None), donate_argnums=0)
    eval_step = functools.partial(step_lib.eval_step, graphdef=graphdef,
                                  loss_chunk_tokens=loss_chunk_tokens)
    eval_fn = jax.jit(_under_rules(eval_step, rules), in_shardings=(state_sh, batch_sh))
    return Built(tx=tx, abstract_state=abstract_state, state_sh=state_sh, batch_sh=batch_sh,
                 init_fn=jax.jit(init, out_shardings=state_sh), step_fn=step_fn,
                 eval_fn=eval_fn)


def _init_from_hf(path: str, cfg, tx, abstract_state, state_sh):
    """Initial state from a HuggingFace checkpoint whose shapes match the configured model."""
    from mla_moe.hf import load_pretrained

    # Each tensor goes straight into its sharding on the run's mesh.
    mesh = jax.tree.leaves(state_sh)[0].mesh
    model = load_pretrained(path, dtype=cfg.param_dtype, mesh=mesh)
    _, params, extra = nnx.split(model, nnx.Param, ...)
    want = ckpt_lib.flatten_state(abstract_state["params"])
    got = ckpt_lib.flatten_state(params)
    mismatch = [k for k in want if k not in got or tuple(got[k].shape) != tuple(want[k].shape)]
    if mismatch or set(got) != set(want):
        raise ConfigError(
            f"--init_from_hf={path!r} does not match the configured model (e.g. "
            f"{(mismatch or sorted(set(got) ^ set(want)))[:3]}); set model.* to its config"
        )

    def build(params, extra):
        return {"step": jax.numpy.zeros((), jax.numpy.int32), "params": params, "extra": extra,
                "opt_state": tx.init(params)}

    return jax.jit(build, out_shardings=state_sh)(params, extra)
