"""Checkpoints: an Orbax `CheckpointManager` holding the train state and the Grain iterator.

The train state is stored as a flat dict `{"params.groups.1.ffn...": array}` so that a
checkpoint is plain named arrays: restoring needs only the abstract state of the current run
(its shapes and, per leaf, the target `NamedSharding`), which is how a checkpoint saved on one
mesh is restored onto another. `load_checkpoint` reads the model alone back from a workdir
(for generation and export).

Saves are asynchronous and atomic (Orbax writes into a temporary directory,
`N.orbax-checkpoint-tmp`, and renames it when complete), so a process killed mid-save leaves
the previous checkpoint as the latest one. `Checkpointer` knows which save is in flight and
which step was the last to complete (`committed`), so that the loop reports a save only once
it is complete.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx
from grain import checkpoint as grain_ckpt

from mla_moe import paths, sharding
from mla_moe.config import ModelConfig
from mla_moe.decoder import DeepSeekModel
from mla_moe.errors import InputError, MissingInputError

STATE, DATA = "state", "data"
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # a save's directory until it is complete


def _key_name(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def flatten_state(tree: Any) -> dict:
    """{dotted path: leaf}."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    flat = {".".join(_key_name(e) for e in path): leaf for path, leaf in leaves}
    if len(flat) != len(leaves):
        raise ValueError("train state has colliding leaf paths")
    return flat


def unflatten_state(template: Any, flat: dict) -> Any:
    """Inverse of `flatten_state` for a tree shaped like `template`."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    keys = [".".join(_key_name(e) for e in path) for path, _ in paths]
    return jax.tree_util.tree_unflatten(treedef, [flat[k] for k in keys])


class Checkpointer:
    """Keeps the last `max_to_keep` checkpoints plus every `keep_every_steps`-th step."""

    def __init__(self, directory: str, ckpt_cfg, *, read_only: bool = False):
        keep_period = int(ckpt_cfg.get("keep_every_steps") or 0) or None
        options = ocp.CheckpointManagerOptions(
            max_to_keep=int(ckpt_cfg.max_to_keep) or None,
            keep_period=keep_period,
            enable_async_checkpointing=bool(ckpt_cfg.async_save),
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,
        )
        self.directory = str(paths.resolve(directory))  # local or gs://
        # Handlers named up front so that metadata can be read before any save/restore call.
        self.manager = ocp.CheckpointManager(
            paths.resolve(directory), options=options,
            item_handlers={STATE: ocp.StandardCheckpointHandler(),
                           DATA: grain_ckpt.CheckpointHandler()},
        )
        self.committed = self.manager.latest_step()  # the newest complete checkpoint
        self._pending: int | None = None  # the save started and not yet seen complete
        self._done: list[int] = []  # completed saves not yet reported by `completed()`

    def latest_step(self) -> int | None:
        """The newest saved step, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every saved step."""
        return list(self.manager.all_steps())

    def saved_shapes(self, step: int) -> dict[str, tuple]:
        """{leaf name: shape} of a saved state, read from its metadata (no array is loaded)."""
        meta = self.manager.item_metadata(step)[STATE]
        tree = getattr(meta, "tree", meta)
        return {k: tuple(v.shape) for k, v in tree.items()}

    def save(self, step: int, state: Any, data_iterator: Any, *, force: bool = False) -> bool:
        """Starts saving `state` (and the iterator's position) at `step`; False if skipped.
        A save still in flight is waited for first (Orbax writes one at a time)."""
        if self._pending is not None:
            self.wait()
        args = {STATE: ocp.args.StandardSave(flatten_state(state))}
        if data_iterator is not None:
            args[DATA] = grain_ckpt.CheckpointSave(data_iterator)
        started = self.manager.save(step, args=ocp.args.Composite(**args), force=force)
        if started:
            self._pending = step
        return started

    def in_flight(self) -> int | None:
        """The step of the save being written, or None (then every started save is complete).
        Reads local state only: safe in a signal handler and on any one process."""
        if self._pending is not None and not self.manager.is_saving_in_progress():
            self._complete()
        return self._pending

    def completed(self) -> list[int]:
        """The steps whose saves have completed since the last call, oldest first."""
        self.in_flight()
        done, self._done = self._done, []
        return done

    def _complete(self) -> None:
        self.committed, self._pending = self._pending, None
        self._done.append(self.committed)

    def data_directory(self, step: int):
        """Where checkpoint `step` keeps the data iterator's state (Grain's, one file per
        process): an epath.Path."""
        return paths.resolve(self.directory) / str(step) / DATA

    def restore(self, step: int, abstract_state: Any, data_iterator: Any) -> Any:
        """`abstract_state`: leaves are `jax.ShapeDtypeStruct`s carrying their target sharding.
        The iterator, if given, is moved in place to the saved position."""
        args = {STATE: ocp.args.StandardRestore(flatten_state(abstract_state))}
        if data_iterator is not None:
            args[DATA] = grain_ckpt.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        return unflatten_state(abstract_state, restored[STATE])

    def wait(self) -> None:
        """Blocks until the pending save is written."""
        self.manager.wait_until_finished()
        if self._pending is not None:
            self._complete()

    def close(self) -> None:
        """Waits for the pending save, then releases the manager."""
        self.wait()
        self.manager.close()


def unfinished_saves(directory) -> list[str]:
    """The names of the saves in `directory` (a Checkpointer's) that never completed: a
    process stopped while writing them. Orbax removes them when a writing manager opens."""
    directory = paths.resolve(directory)
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if TMP_SUFFIX in p.name)


def load_checkpoint(workdir: str, step: int | None = None) -> tuple[DeepSeekModel, int]:
    """(model, step): the model of a training workdir, its `config.json` and the parameters
    (and non-Param model state) of checkpoint `step` (latest by default), on one device; the
    optimizer state is not read."""
    config = workdir_model_config(workdir)
    options = ml_collections.ConfigDict(
        {"max_to_keep": 1, "keep_every_steps": 0, "async_save": False})
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise MissingInputError(f"--checkpoint={workdir!r} has no checkpoints/ directory; pass "
                                "the --workdir of a training run")
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), options, read_only=True)
    steps = ckpt.all_steps()
    if not steps:
        raise MissingInputError(f"--checkpoint={workdir!r} has no checkpoint yet; train until "
                                "the first save (checkpoint.every_steps)")
    if step is not None and step not in steps:
        raise InputError(f"--step={step}: {workdir!r} has checkpoints at steps {steps}")
    step = max(steps) if step is None else step
    abstract = sharding.abstract_model(lambda: DeepSeekModel(config, rngs=nnx.Rngs(0)))
    graphdef, params, extra = nnx.split(abstract, nnx.Param, ...)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          {"params": params, "extra": extra})
    state = _restore_model_state(ckpt, step, target, workdir)
    ckpt.close()
    return nnx.merge(graphdef, state["params"], state["extra"]), step


def _restore_model_state(ckpt: Checkpointer, step: int, target: dict, workdir: str) -> dict:
    """The part of checkpoint `step`'s train state that `target` (abstract arrays) names."""
    flat = flatten_state(target)
    # The train state also holds the step and the optimizer state: the Checkpointer's handler
    # restores whole trees only, so those are read too (as saved) and dropped.
    meta = ckpt.manager.item_metadata(step)[STATE]
    meta = getattr(meta, "tree", meta)
    missing = sorted(set(flat) - set(meta))
    if missing:
        raise InputError(f"{workdir} step {step} does not hold the model of its config.json "
                         f"(e.g. {missing[:3]}); was the workdir reused?")
    device = jax.tree.leaves(target)[0].sharding
    whole = {k: flat.get(k) or jax.ShapeDtypeStruct(tuple(v.shape), v.dtype, sharding=device)
             for k, v in meta.items()}
    restored = ckpt.manager.restore(step, args=ocp.args.Composite(**{
        STATE: ocp.args.StandardRestore(whole)}))
    return unflatten_state(target, {k: restored[STATE][k] for k in flat})


def workdir_model_config(workdir: str) -> ModelConfig:
    """The ModelConfig recorded in a training workdir's config.json."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isdir(workdir):
        raise MissingInputError(f"--checkpoint={workdir!r} is not a directory; pass the "
                                "--workdir of a training run")
    if not os.path.isfile(path):
        raise MissingInputError(f"--checkpoint={workdir!r} has no config.json; pass the "
                                "--workdir of a training run")
    try:
        with open(path) as f:
            model = json.load(f)["model"]
        return ModelConfig(**model)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise InputError(f"{path} does not describe a model ({type(e).__name__}: {e}); pass "
                         "the --workdir of a training run") from None
