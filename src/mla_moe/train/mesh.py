"""The device mesh and the shardings the trainer uses.

Axes: `data`, `fsdp`, `expert`, `tensor`. The batch is split over (`data`, `fsdp`); the train
state's layout comes from `param_shardings`, the single place the model-sharding rules plug in
(today: replicated).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
    """Resolves the config's axis sizes (-1 = the remaining devices) and checks the product."""
    sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
    for name, size in zip(MESH_AXES, sizes):
        if size == 0 or size < -1:
            raise ValueError(f"mesh.{name} must be a positive size or -1, got {size}")
    free = [name for name, size in zip(MESH_AXES, sizes) if size == -1]
    if len(free) > 1:
        names = ", ".join("mesh." + a for a in free)
        raise ValueError(f"only one mesh axis may be -1, got {names}")
    fixed = math.prod(s for s in sizes if s != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(
                f"mesh.{free[0]}=-1: {num_devices} devices are not divisible by the other "
                f"axes' product {fixed}"
            )
        sizes[MESH_AXES.index(free[0])] = num_devices // fixed
    elif fixed != num_devices:
        desc = " x ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes))
        raise ValueError(f"mesh {desc} needs {fixed} devices, but there are {num_devices}")
    return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_cfg, len(devices))
    # Auto axes: the jitted step states its in/out shardings; Explicit mode's sharding-in-types
    # would also demand annotations inside the model.
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)


def data_parallel_size(mesh: jax.sharding.Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_shardings(abstract_state, mesh: jax.sharding.Mesh):
    """Shardings for every leaf of the train state (params, optimizer moments, step, ...).

    Replicated for now; the model-sharding work replaces this one function with its logical
    rules (it receives the abstract state, so it can read leaf paths, shapes and metadata).
    """
    return jax.tree.map(lambda _: replicated(mesh), abstract_state)


def global_batch(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict:
    """Assembles per-process numpy batches into global jax.Arrays sharded over the batch axes."""
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in local_batch.items()
    }
