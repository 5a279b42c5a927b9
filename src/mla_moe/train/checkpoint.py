"""Checkpoints: an Orbax `CheckpointManager` holding the train state and the Grain iterator.

The train state is stored as a flat dict `{"params.groups.1.ffn...": array}` so that a
checkpoint is plain named arrays: restoring needs only the abstract state of the current run
(its shapes and, per leaf, the target `NamedSharding`), which is how a checkpoint saved on one
mesh is restored onto another.

Saves are asynchronous and atomic (Orbax writes into a temporary directory and renames it when
complete), so a process killed mid-save leaves the previous checkpoint as the latest one.
"""

from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp
from grain import checkpoint as grain_ckpt

from mla_moe import paths

STATE, DATA = "state", "data"


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

    def latest_step(self) -> int | None:
        """The newest saved step, or None when the directory holds none."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every saved step still kept."""
        return list(self.manager.all_steps())

    def saved_shapes(self, step: int) -> dict[str, tuple]:
        """{leaf name: shape} of a saved state, read from its metadata (no array is loaded)."""
        meta = self.manager.item_metadata(step)[STATE]
        tree = getattr(meta, "tree", meta)
        return {k: tuple(v.shape) for k, v in tree.items()}

    def save(self, step: int, state: Any, data_iterator: Any, *, force: bool = False) -> bool:
        """Saves the state (and the data iterator's position, if given) as `step`, in the
        background when async; returns whether the manager saved (its policy may skip a step)."""
        args = {STATE: ocp.args.StandardSave(flatten_state(state))}
        if data_iterator is not None:
            args[DATA] = grain_ckpt.CheckpointSave(data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

    def restore(self, step: int, abstract_state: Any, data_iterator: Any) -> Any:
        """`abstract_state`: leaves are `jax.ShapeDtypeStruct`s carrying their target sharding.
        The iterator, if given, is moved in place to the saved position."""
        args = {STATE: ocp.args.StandardRestore(flatten_state(abstract_state))}
        if data_iterator is not None:
            args[DATA] = grain_ckpt.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        return unflatten_state(abstract_state, restored[STATE])

    def wait(self) -> None:
        """Blocks until a background save has finished."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Finishes any background save and releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()
