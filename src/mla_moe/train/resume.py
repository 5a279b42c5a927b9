"""The workdir: refuse one this run cannot use, then resume its latest checkpoint or start.

`plan` runs with the other input checks, before anything is compiled or written: it refuses a
workdir this config cannot continue, finds the latest checkpoint and, when the run continues
with another `train.steps`, keeps its learning-rate schedule (saying so). `open_workdir` then
creates the workdir, restores the latest checkpoint (after checking that its shapes fit the
model) or initialises a state, and records the run's config.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

from absl import logging

from mla_moe import paths
from mla_moe.data import stream_state
from mla_moe.errors import InputError
from mla_moe.train import checkpoint as ckpt_lib
from mla_moe.train import config as config_lib
from mla_moe.train import metrics as metrics_lib
from mla_moe.train import optimizer as optimizer_lib


class IncompatibleWorkdirError(InputError):
    """The workdir holds checkpoints of a run this config cannot continue."""


def config_json(config) -> dict:
    """`config` as the JSON object written to (and compared with) the workdir's config.json."""
    return json.loads(json.dumps(config.to_dict(), default=str))


def check_workdir(workdir, config) -> None:
    """Refuses (before writing anything) a workdir that is not a directory we can write, or
    whose run this config cannot continue. `workdir`: an epath.Path (local or gs://)."""
    if workdir.exists() and not workdir.is_dir():
        raise InputError(
            f"--workdir={str(workdir)!r} is a file, not a directory; pass a new or "
            "existing directory"
        )
    if not paths.is_url(workdir):  # a bucket's permissions show at the first write
        parent = str(workdir)
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.access(parent, os.W_OK | os.X_OK):
            raise InputError(
                f"--workdir={str(workdir)!r}: {parent!r} is not writable; pass a "
                "directory you can write to"
            )
    path = workdir / "config.json"
    if not path.exists():
        return
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IncompatibleWorkdirError(
            f"{path} is not valid JSON ({e}); this is not a training workdir we wrote: use a "
            "new --workdir"
        ) from None
    diffs = config_lib.incompatible_fields(saved, config_json(config))
    if diffs:
        raise IncompatibleWorkdirError(
            f"workdir {workdir!r} holds a run with a different config ({'; '.join(diffs)}); "
            "use a new --workdir, or the same settings to resume"
        )


def latest_step(workdir) -> int | None:
    """The workdir's latest complete checkpoint, read without changing anything (None: none)."""
    if not (workdir / "checkpoints").is_dir():
        return None
    options = {"max_to_keep": 1, "keep_every_steps": 0, "async_save": False}
    import ml_collections

    ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints", ml_collections.ConfigDict(options),
                                 read_only=True)
    try:
        return ckpt.latest_step()
    finally:
        ckpt.close()


def plan(workdir, config, *, is_main: bool):
    """(config, latest checkpoint step or None): `check_workdir`, then, for a run that continues
    with another `train.steps`, `config` with the decay length the run had (see
    `continue_schedule`). Writes nothing."""
    check_workdir(workdir, config)
    latest = latest_step(workdir)
    path = workdir / "config.json"
    if latest is None or latest >= config.train.steps or not path.exists():
        return config, latest
    config, message = continue_schedule(json.loads(path.read_text()), config, latest)
    if message and is_main:
        print(message, flush=True)
    return config, latest


def continue_schedule(saved: dict, config, step: int):
    """(config, a line for the console or None) for a run saved with config `saved` (its
    config.json) continuing from `step`. Unless `train.decay_steps` is given, the learning rate
    keeps the decay length of the saved run, whatever `train.steps` now says; the line says what
    the schedule does when train.steps or decay_steps changes."""
    t = config.train
    saved_t = saved.get("train", {})
    saved_steps = int(saved_t.get("steps", t.steps))
    saved_decay = int(saved_t.get("decay_steps") or saved_steps)
    decay = int(t.decay_steps or saved_decay)
    if decay != (t.decay_steps or t.steps):
        config = copy.deepcopy(config)
        config.train.decay_steps = decay
    if decay == saved_decay and saved_steps == t.steps:
        return config, None
    lr = optimizer_lib.learning_rate_schedule(config.train)
    if decay != saved_decay:
        before = copy.deepcopy(config.train)
        before.decay_steps = saved_decay
        before = optimizer_lib.learning_rate_schedule(before)
        return config, (
            f"train.decay_steps {saved_decay} -> {decay}: the learning rate of step {step + 1} "
            f"is {float(lr(step)):.2e} (it was {float(before(step)):.2e}); the cosine now "
            f"ends at step {decay}")
    end = (f"then held at {float(lr(decay)):.2e} to step {t.steps}" if t.steps > decay
           else f"ending at {float(lr(t.steps)):.2e} at step {t.steps}")
    return config, (
        f"train.steps {saved_steps} -> {t.steps}: the learning rate keeps this run's schedule "
        f"(cosine decay to step {decay}, {end}); pass --config.train.decay_steps=M to decay "
        "to step M instead")


def check_checkpoint_shapes(ckpt: ckpt_lib.Checkpointer, step: int, abstract_state) -> None:
    """Refuses a checkpoint whose arrays do not have the shapes of `abstract_state`."""
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


@dataclasses.dataclass
class OpenWorkdir:
    """A workdir ready for the loop: the state to continue from, and its writers."""

    state: Any
    ckpt: ckpt_lib.Checkpointer
    writer: metrics_lib.MetricWriter
    resumed_from: int | None  # the restored checkpoint's step; None for a fresh start


def open_workdir(
    workdir,
    config,
    built,
    data_iterator,
    init_state: Callable[[], Any],
    *,
    read_first: bool,
    is_main: bool,
) -> OpenWorkdir:
    """Restores the workdir's latest checkpoint (state and `data_iterator`), else starts from
    `init_state()` and writes config.json. `built`: the run's `setup.Built`. `read_first`:
    call `init_state` before writing anything when the workdir has no checkpoints (HF weights
    are read, and checked, before the workdir changes)."""
    state = None
    if read_first and not (workdir / "checkpoints").is_dir():
        state = init_state()
    workdir.mkdir(parents=True, exist_ok=True)
    unfinished = ckpt_lib.unfinished_saves(workdir / "checkpoints")
    if unfinished and is_main:
        print(f"removing {', '.join(unfinished)}: a save that never completed (the run was "
              "stopped while writing it)", flush=True)
    ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints", config.checkpoint)  # removes them
    writer = metrics_lib.MetricWriter(workdir, is_main, config.log.tensorboard)
    latest = ckpt.latest_step()
    if latest is not None:
        # The data position first: it belongs to a process count and data settings.
        stream_state.check_saved(ckpt.data_directory(latest), data_iterator, latest)
        check_checkpoint_shapes(ckpt, latest, built.abstract_state)
        state = ckpt.restore(latest, built.state_spec(), data_iterator)
        writer.truncate_after(latest)
        logging.info("resumed from checkpoint step %d", latest)
        print(f"resuming from step {latest} ({ckpt.directory})", flush=True)
    else:
        logged = writer.steps()
        if logged:
            rows = (f"the {len(logged)} rows of metrics.jsonl (steps {min(logged)}-"
                    f"{max(logged)})" if len(logged) > 1 else
                    f"the row of metrics.jsonl (step {logged[0]})")
            print(f"no complete checkpoint in {ckpt.directory}: starting at step 0, and "
                  f"dropping {rows} that this run rewrites", flush=True)
        writer.truncate_after(0)
        if state is None:
            state = init_state()
    if is_main:  # the settings of the latest run (train.steps, its decay, the mesh ...)
        (workdir / "config.json").write_text(json.dumps(config_json(config), indent=2))
    return OpenWorkdir(state=state, ckpt=ckpt, writer=writer, resumed_from=latest)
