"""The workdir: refuse one this run cannot use, then resume its latest checkpoint or start.

`check_workdir` runs with the other input checks, before anything is compiled or written;
`open_workdir` then creates the workdir, restores the latest checkpoint (after checking that
its shapes fit the model) or initialises a state and records the run's config.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

from absl import logging

from mla_moe import paths
from mla_moe.errors import InputError
from mla_moe.train import checkpoint as ckpt_lib
from mla_moe.train import config as config_lib
from mla_moe.train import metrics as metrics_lib


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
    ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints", config.checkpoint)
    writer = metrics_lib.MetricWriter(workdir, is_main, config.log.tensorboard)
    latest = ckpt.latest_step()
    if latest is not None:
        check_checkpoint_shapes(ckpt, latest, built.abstract_state)
        state = ckpt.restore(latest, built.state_spec(), data_iterator)
        writer.truncate_after(latest)
        logging.info("resumed from checkpoint step %d", latest)
        print(f"resuming from step {latest} ({ckpt.directory})", flush=True)
    else:
        if state is None:
            state = init_state()
        if is_main:
            (workdir / "config.json").write_text(json.dumps(config_json(config), indent=2))
    return OpenWorkdir(state=state, ckpt=ckpt, writer=writer, resumed_from=latest)
